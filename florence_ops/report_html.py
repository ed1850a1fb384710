"""Rendering of the self-contained HTML evaluation report (no I/O; `reports.write_html_report` writes it).

The page is `templates/report.html.j2`; this module gives it its figures. Scores are shown as percentages (0-100), as
DocVQA results are usually quoted. All text is escaped by the template; images are small JPEG thumbnails embedded as
data URIs, so the file opens anywhere without network access.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from florence_ops.templating import render

REPORT_TEMPLATE = "report.html.j2"
THUMBNAIL_WIDTH = 240
HEADLINE_ROWS = (
    ("anls", "ANLS", "Official DocVQA metric: best over all accepted answers, lower-cased, whitespace-normalised."),
    (
        "levenshtein_similarity",
        "Levenshtein similarity",
        "The tutorial's metric (its “0 → 57”): first answer only, case-sensitive. Not ANLS.",
    ),
    ("exact_match", "Exact match", "Normalised prediction equals an accepted answer."),
)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _delta(after: float | None, before: float | None) -> dict[str, str] | None:
    if after is None or before is None:
        return None
    change = (after - before) * 100
    return {"text": f"{change:+.1f}", "css": "up" if change > 0 else "down" if change < 0 else ""}


def thumbnail_data_uri(image: Image.Image, width: int = THUMBNAIL_WIDTH, quality: int = 75) -> str:
    """A `data:image/jpeg;base64,...` URI of `image` shrunk to at most `width` pixels wide (aspect kept)."""
    picture = image.convert("RGB")
    if picture.width > width:
        picture = picture.resize((width, max(1, round(picture.height * width / picture.width))), Image.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _headline(metrics: Mapping[str, Any], before: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, name, note in HEADLINE_ROWS:
        after_value, before_value = metrics.get(key), before.get(key)
        rows.append(
            {
                "name": name,
                "note": note,
                "before": _pct(before_value),
                "after": _pct(after_value),
                "delta": _delta(after_value, before_value),
            }
        )
    return rows


def _bar(css: str, value: float | None) -> dict[str, str]:
    width = 0.0 if value is None else max(0.0, min(100.0, 100 * value))
    return {"css": css, "width": f"{width:.1f}"}


def _by_type(metrics: Mapping[str, Any], before: Mapping[str, Any]) -> list[dict[str, Any]]:
    after_types, before_types = metrics.get("by_type", {}), before.get("by_type", {})
    rows = []
    for question_type in sorted(set(after_types) | set(before_types), key=str.casefold):
        after_row, before_row = after_types.get(question_type, {}), before_types.get(question_type, {})
        after_value, before_value = after_row.get("anls"), before_row.get("anls")
        rows.append(
            {
                "name": question_type,
                "count": after_row.get("n_questions", before_row.get("n_questions", 0)),
                "before": _pct(before_value),
                "after": _pct(after_value),
                "delta": _delta(after_value, before_value),
                "bars": [_bar("before", before_value), _bar("after", after_value)],
            }
        )
    return rows


def _score_colour(value: float) -> str:
    return "#1b873f" if value >= 0.8 else "#b7791f" if value >= 0.5 else "#c62828"


def _card(row: Mapping[str, Any], image_uri: str | None) -> dict[str, Any]:
    score = float(row.get("anls", 0.0))
    return {
        "image_uri": image_uri,
        "image_id": str(row.get("image_id", "")),
        "question": row.get("question", ""),
        "answers": list(row.get("answers", [])),
        "prediction": row.get("prediction", ""),
        "question_id": str(row.get("question_id", "")),
        "question_types": list(row.get("question_types", [])),
        "score": _pct(score),
        "colour": _score_colour(score),
    }


def select_examples(
    rows: Sequence[Mapping[str, Any]], n: int
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The `n` lowest-ANLS rows and the `n` highest among the rest (ties broken by question_id, so it is stable)."""
    ordered = sorted(rows, key=lambda row: (row["anls"], str(row.get("question_id", ""))))
    worst = ordered[:n]
    best = sorted(ordered[len(worst) :], key=lambda row: (-row["anls"], str(row.get("question_id", ""))))[:n]
    return worst, best


def _gallery(title: str, rows: Sequence[Mapping[str, Any]], image_uri: Callable[[str], str | None]) -> dict:
    return {"title": title, "cards": [_card(row, image_uri(str(row.get("image_id", "")))) for row in rows]}


def render_html_report(
    metrics: Mapping[str, Any],
    before_metrics: Mapping[str, Any] | None,
    rows: Sequence[Mapping[str, Any]],
    thumbnail: Callable[[str], Image.Image | None],
    n_examples: int = 8,
    title: str = "Florence-2 on DocVQA: evaluation report",
) -> str:
    """The report as one HTML string; see `florence_ops.reports.write_html_report` for the contents."""
    before = before_metrics or {}
    cache: dict[str, str | None] = {}

    def image_uri(image_id: str) -> str | None:
        # Several questions share a document: encode each image once.
        if image_id not in cache:
            image = thumbnail(image_id) if image_id else None
            cache[image_id] = None if image is None else thumbnail_data_uri(image)
        return cache[image_id]

    worst, best = select_examples(rows, n_examples)
    n_after, n_before = metrics.get("n_questions"), before.get("n_questions")
    return render(
        REPORT_TEMPLATE,
        title=title,
        subtitle=(
            f"{metrics.get('n_questions', len(rows))} questions. Scores are percentages (0–100); "
            "changes are in percentage points."
        ),
        headline=_headline(metrics, before),
        n_before="—" if n_before is None else n_before,
        n_after="—" if n_after is None else n_after,
        by_type=_by_type(metrics, before),
        galleries=[
            _gallery(f"Lowest ANLS ({len(worst)})", worst, image_uri),
            _gallery(f"Highest ANLS ({len(best)})", best, image_uri),
        ],
    )

"""Evaluation outputs: metrics JSON, per-question predictions, DVC plot data and the HTML report.

Every writer is atomic (`florence_ops.artifacts.write_text_atomic`): a crashed or interrupted stage never leaves a
half-written file for DVC to hash. JSON files are written by `artifacts.write_json`, in the one style of every metrics
file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from florence_ops.artifacts import write_json, write_text_atomic
from florence_ops.report_html import render_html_report

PLOT_STAGES = ("before", "after")


def _to_json(obj: Any) -> str:
    # allow_nan=False: NaN is not JSON, and DVC and browsers reject it.
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False)


def write_predictions(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write `rows` as JSON Lines (one object per line, sorted keys, UTF-8), atomically."""
    return write_text_atomic(path, "".join(_to_json(dict(row)) + "\n" for row in rows))


def read_predictions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON Lines file written by `write_predictions`."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def type_plot_rows(by_type: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plot rows `{"question_type", "anls", "n_questions"}` of one `aggregate(...)["by_type"]`, sorted by type.

    Types without a score (no questions) are left out rather than drawn as zero.
    """
    return [
        {"question_type": question_type, "anls": figures["anls"], "n_questions": figures["n_questions"]}
        for question_type, figures in sorted(by_type.items())
        if figures.get("anls") is not None
    ]


def write_type_plot_data(
    directory: str | os.PathLike[str],
    after_by_type: Mapping[str, Mapping[str, Any]],
    before_by_type: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, Path]:
    """Write ANLS by question type as `directory/before.json` and `directory/after.json` (see `type_plot_rows`).

    One file per stage because DVC's built-in bar template facets by file: `bar_horizontal` with `x: anls` and
    `y: {<dir>/before.json: question_type, <dir>/after.json: question_type}` draws the two side by side (one long
    file with a stage column would be stacked into meaningless sums). Returns the paths by stage.
    """
    by_stage = {"before": before_by_type or {}, "after": after_by_type}
    return {
        stage: write_json(Path(directory) / f"{stage}.json", type_plot_rows(by_stage[stage])) for stage in PLOT_STAGES
    }


def write_html_report(
    path: str | os.PathLike[str],
    metrics: Mapping[str, Any],
    before_metrics: Mapping[str, Any] | None,
    rows: Sequence[Mapping[str, Any]],
    thumbnail: Callable[[str], Image.Image | None],
    n_examples: int = 8,
) -> Path:
    """Write one self-contained HTML report (inline CSS, thumbnails as data URIs), atomically.

    `metrics` and `before_metrics` are `aggregate(...)` results after and before fine-tuning (`before_metrics` may be
    None); `rows` are scored prediction rows; `thumbnail(image_id)` gives a document image or None. The report shows
    the headline figures with their differences, ANLS by question type with a bar chart, and the `n_examples`
    lowest- and highest-scoring questions.
    """
    html_text = render_html_report(metrics, before_metrics, rows, thumbnail, n_examples=n_examples)
    return write_text_atomic(path, html_text)

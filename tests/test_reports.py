"""Tests of florence_ops.reports: the files the evaluate stage writes, their schema, escaping and atomicity."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

from PIL import Image

from florence_ops.artifacts import PREDICTION_COLUMNS, SCORE_NAMES
from florence_ops.metrics import aggregate, score_predictions
from florence_ops.reports import (
    read_predictions,
    write_html_report,
    write_predictions,
    write_type_plot_data,
)

MALICIOUS = "<script>alert('owned')</script> & what?"


def _rows() -> list[dict]:
    records = [
        {
            "question_id": str(index),
            "question": MALICIOUS if index == 0 else f"Question {index}?",
            "answers": ["ITC Limited", "itc limited"],
            "prediction": ["ITC Limited", "ITC", "<b>bold</b>", "itc limited"][index % 4],
            "question_types": ["layout", "table/list"] if index % 2 else ["form"],
            "image_id": f"doc{index // 2}",
        }
        for index in range(10)
    ]
    return score_predictions(records)


def _thumbnail(image_id: str) -> Image.Image | None:
    return None if image_id == "doc1" else Image.new("RGB", (850, 1100), (250, 250, 245))


def _no_temp_files(directory: Path) -> bool:
    return not [path for path in directory.iterdir() if path.name.endswith(".tmp")]


def test_write_predictions_round_trips_json_lines(tmp_path: Path) -> None:
    rows = _rows()
    path = write_predictions(tmp_path / "predictions.jsonl", rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(rows)
    assert read_predictions(path) == rows
    first = json.loads(lines[0])
    assert set(first) == {*PREDICTION_COLUMNS, *SCORE_NAMES}
    assert _no_temp_files(tmp_path)


def test_write_type_plot_data_one_file_per_stage(tmp_path: Path) -> None:
    after = aggregate(_rows())["by_type"]
    before = {"form": {"anls": 0.1, "n_questions": 5}, "layout": {"anls": None, "n_questions": 0}}
    paths = write_type_plot_data(tmp_path / "anls_by_type", after, before)
    assert paths == {
        "before": tmp_path / "anls_by_type" / "before.json",
        "after": tmp_path / "anls_by_type" / "after.json",
    }
    after_rows = json.loads(paths["after"].read_text())
    assert [row["question_type"] for row in after_rows] == ["form", "layout", "table/list"]
    assert all(set(row) == {"question_type", "anls", "n_questions"} for row in after_rows)
    assert after_rows[0] == {"question_type": "form", "anls": after["form"]["anls"], "n_questions": 5}
    # A type with no scored questions is left out, not drawn as zero.
    assert json.loads(paths["before"].read_text()) == [{"question_type": "form", "anls": 0.1, "n_questions": 5}]
    write_type_plot_data(tmp_path / "no_baseline", after, None)
    assert json.loads((tmp_path / "no_baseline" / "before.json").read_text()) == []


def _report(tmp_path: Path, rows: list[dict], before: dict | None, n_examples: int = 3) -> str:
    path = write_html_report(tmp_path / "report.html", aggregate(rows), before, rows, _thumbnail, n_examples)
    assert _no_temp_files(tmp_path)
    return path.read_text(encoding="utf-8")


def test_html_report_escapes_text(tmp_path: Path) -> None:
    rows = _rows()
    rows.sort(key=lambda row: row["question_id"] != "0")
    rows[0]["prediction"] = MALICIOUS
    rows[0]["anls"] = 0.0
    html_text = _report(tmp_path, rows, None)
    assert "<script>" not in html_text
    assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt; &amp; what?" in html_text
    assert "<b>bold</b>" not in html_text


def test_html_report_is_self_contained_with_thumbnails(tmp_path: Path) -> None:
    html_text = _report(tmp_path, _rows(), aggregate(score_predictions([])))
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html_text)
    assert "<link" not in html_text and "@import" not in html_text
    uris = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', html_text)
    assert uris, "no embedded thumbnails"
    image = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert image.format == "JPEG" and image.width == 240
    assert "no image" in html_text  # doc1 has no thumbnail: placeholder
    assert "Levenshtein similarity" in html_text and "first answer only, case-sensitive" in html_text


def test_html_report_shows_before_after_and_change(tmp_path: Path) -> None:
    rows = _rows()
    before_rows = score_predictions([{**row, "prediction": ""} for row in rows])
    html_text = _report(tmp_path, rows, aggregate(before_rows))
    after_anls = aggregate(rows)["anls"]
    assert f"{100 * after_anls:.1f}" in html_text
    assert f"+{100 * after_anls:.1f}" in html_text  # before is 0.0
    assert "Before fine-tuning" in html_text and "table/list" in html_text
    assert html_text.count('class="card"') == 6  # 3 worst + 3 best


def test_html_report_with_zero_rows(tmp_path: Path) -> None:
    html_text = _report(tmp_path, [], None)
    assert html_text.startswith("<!DOCTYPE html>")
    assert "No questions." in html_text


def test_html_report_with_fewer_rows_than_examples(tmp_path: Path) -> None:
    rows = _rows()[:3]
    html_text = _report(tmp_path, rows, None, n_examples=8)
    assert html_text.count('class="card"') == 3

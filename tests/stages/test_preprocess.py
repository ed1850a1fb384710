"""Contract of the preprocess stage on a local folder with 5% bad records: the files it writes and when it fails."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from florence_ops.data import validation as checks
from florence_ops.data.processed import QUESTION_FEATURES, ImageTable, model_input_size, read_questions
from florence_ops.data.sources import materialize_raw
from florence_ops.errors import DataQualityError, DataSourceError, UserError
from florence_ops.params_file import read_yaml
from florence_ops.stages.preprocess import preprocess
from tests.conftest import REPO, tiny_params
from tests.stages.conftest import declared_outputs, files, under
from tests.stages.test_download import DOWNLOAD_FILES

PAGES, QUESTIONS_PER_PAGE = 19, 5  # 95 good records on 19 pages
SIZE = (24, 32)  # model input (height, width)
PROCESSED = ("images.parquet", "quarantine.jsonl", "train.parquet", "validation.parquet", "test.parquet")
PREPROCESS_FILES = {f"data/processed/{name}" for name in PROCESSED} | {"reports/data_quality.json"}
BAD_REASONS = {
    checks.MALFORMED_JSON: 1,
    checks.IMAGE_MISSING: 1,
    checks.QUESTION_EMPTY: 1,
    checks.DUPLICATE_ID: 1,
    checks.NOT_AN_IMAGE: 1,
}


@pytest.fixture
def folder(tmp_path) -> Path:
    """100 annotation lines: 95 good records on 19 pages and 5 bad ones, one of each reason in BAD_REASONS."""
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for page in range(PAGES):
        pixels = rng.integers(0, 256, (50 + page, 40, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG")
        (root / f"page{page}.jpg").write_bytes(buffer.getvalue())
        for q in range(QUESTIONS_PER_PAGE):
            answer = f"answer {page}.{q}"
            lines.append(json.dumps({"question_id": f"{page}-{q}", "question": f" Q{q}? ", "answers": [answer],
                                     "image": f"page{page}.jpg", "question_types": ["form"]}))  # fmt: skip
    (root / "notes.jpg").write_text("not an image")
    bad = {"question": "Q?", "answers": ["a"], "image": "page0.jpg"}
    lines[10:10] = ['{"question_id": "x1", "question": "Q?"']  # line 11
    lines += [
        json.dumps({**bad, "question_id": "x2", "image": "nowhere.jpg"}),
        json.dumps({**bad, "question_id": "x3", "question": ""}),
        json.dumps({**bad, "question_id": "0-0"}),
        json.dumps({**bad, "question_id": "x5", "image": "notes.jpg"}),
    ]
    assert len(lines) == 100
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return root


def prepare(tmp_path: Path, folder: Path, **overrides):
    """Params for a workspace under tmp_path whose raw data and base-model config are in place."""
    params = tiny_params(tmp_path / "ws", **{"data.source": "local", "data.local.path": str(folder), **overrides})
    materialize_raw(params.data, params.seed, Path(params.paths.raw))
    base = Path(params.paths.base_model)
    base.mkdir(parents=True, exist_ok=True)
    (base / "preprocessor_config.json").write_text(json.dumps({"size": {"height": SIZE[0], "width": SIZE[1]}}))
    return params


def test_too_many_bad_records_fail_with_one_line_message(tmp_path, folder):
    params = prepare(tmp_path, folder)  # data.max_bad_fraction: 0.01 from params.yaml
    report = Path(params.paths.reports) / "data_quality.json"
    with pytest.raises(DataQualityError) as failure:
        preprocess(params)

    assert isinstance(failure.value, UserError)
    assert str(failure.value) == (
        f"5 of 100 input records failed validation (5.0% > data.max_bad_fraction 1.0%); see {report}"
    )
    assert json.loads(report.read_text())["by_reason"] == BAD_REASONS
    assert not Path(params.paths.processed).exists()
    assert sorted(path.name for path in Path(params.paths.processed).parent.iterdir()) == ["raw"]


def test_accepted_run_writes_exactly_the_contract(tmp_path, folder):
    params = prepare(tmp_path, folder, **{"data.max_bad_fraction": 0.1})
    summary = preprocess(params)
    processed, report = Path(params.paths.processed), Path(params.paths.reports) / "data_quality.json"

    assert sorted(path.name for path in processed.iterdir()) == [
        "images.parquet", "quarantine.jsonl", "test.parquet", "train.parquet", "validation.parquet",
    ]  # fmt: skip
    assert json.loads(report.read_text()) == summary
    assert summary["n_in"] == summary["n_ok"] + summary["n_bad"] == 100
    assert (summary["n_ok"], summary["n_bad"], summary["n_images"]) == (95, 5, PAGES)
    assert summary["by_reason"] == BAD_REASONS and summary["bad_fraction"] == 0.05
    quarantine = [json.loads(line) for line in (processed / "quarantine.jsonl").read_text().splitlines()]
    assert quarantine == summary["bad"]
    assert all(set(entry) == {"id", "split", "reason", "detail", "line"} for entry in quarantine)
    assert {entry["reason"]: entry["line"] for entry in quarantine}[checks.MALFORMED_JSON] == 11

    questions = {split: read_questions(processed, split) for split in ("train", "validation", "test")}
    assert all(split.features == QUESTION_FEATURES for split in questions.values())
    assert sum(len(split) for split in questions.values()) == 95
    row = questions["train"][0]
    assert row["question"] == row["question"].strip() and row["question_types"] == ["form"]
    table = ImageTable(processed)
    assert len(table) == PAGES and set(questions["train"]["image_id"]) <= set(table.ids)
    image = table[row["image_id"]]
    assert image.mode == "RGB" and image.size == (SIZE[1], SIZE[0])


def test_output_does_not_depend_on_worker_count(tmp_path, folder):
    outputs = []
    for workers in (1, 2):
        params = prepare(tmp_path / str(workers), folder, **{"data.max_bad_fraction": 0.1, "data.num_workers": workers})
        preprocess(params)
        processed = Path(params.paths.processed)
        outputs.append({path.name: path.read_bytes() for path in sorted(processed.iterdir())})
    assert outputs[0] == outputs[1]


def test_cli_reports_the_failure_in_one_line_and_exits_2(tmp_path, folder):
    params = prepare(tmp_path, folder)
    config = read_yaml(REPO / "params.yaml")
    config["paths"] = {key: str(value) for key, value in vars(params.paths).items()}
    config["data"].update(source="local", local={**config["data"]["local"], "path": str(folder)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "florence_ops.cli", "preprocess", "--params", "params.yaml"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 5 of 100 input records failed validation")


def test_model_input_size_reads_either_processor_layout(tmp_path):
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"image_processor": {"size": {"height": 7, "width": 9}}})
    )
    assert model_input_size(tmp_path) == (7, 9)  # transformers 5 saving a whole processor
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 768, "width": 768}}))
    assert model_input_size(tmp_path) == (768, 768)
    with pytest.raises(DataSourceError, match="run `florence-ops download` first"):
        model_input_size(tmp_path / "missing")


def test_preprocess_writes_exactly_its_outputs_and_download_and_preprocess_nothing_else(prepared):
    """`prepared` is a fresh workspace after download and preprocess on the tiny synthetic default."""
    written = set(files(prepared))
    assert under(written, declared_outputs("preprocess")) == PREPROCESS_FILES
    assert written == DOWNLOAD_FILES | PREPROCESS_FILES

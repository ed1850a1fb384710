"""Contract of the evaluate stage: the files it writes, questions without answers (an unlabeled split's) skipped, and
a one-line error when a split has none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from florence_ops.data.sources import materialize_raw
from florence_ops.errors import UserError
from florence_ops.stages.evaluate import evaluate
from florence_ops.stages.preprocess import preprocess
from tests.conftest import tiny_params
from tests.stages.conftest import declared_outputs, under

REPORTS = ("metrics.json", "predictions.jsonl", "report.html", "anls_by_type/before.json", "anls_by_type/after.json")
EVALUATE_FILES = {f"reports/{name}" for name in REPORTS}


def test_evaluate_writes_exactly_its_outputs(evaluated):
    root, wrote, metrics = evaluated
    assert under(wrote, declared_outputs("evaluate")) == wrote == EVALUATE_FILES
    on_disk = json.loads((root / "reports/metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("anls", "levenshtein_similarity", "exact_match", "n_questions"):
        assert key in on_disk and key in on_disk["before"]
    assert on_disk["n_questions"] == 16 and on_disk["by_type"]
    rows = [json.loads(line) for line in (root / "reports/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"question_id", "answers", "prediction", "anls", "question_types"} <= set(rows[0])
    assert (root / "reports/report.html").read_text().startswith("<!DOCTYPE html>")


def local_test_split(root: Path) -> Path:
    """A local folder whose test split has two labeled and two unlabeled questions."""
    root.mkdir()
    Image.new("RGB", (60, 80), (240, 240, 240)).save(root / "page.png")
    lines = [
        {"question_id": "tr", "question": "Q?", "answers": ["a"], "image": "page.png", "split": "train"},
        {"question_id": "va", "question": "Q?", "answers": ["a"], "image": "page.png", "split": "validation"},
        {"question_id": "l1", "question": "Is it signed?", "answers": ["no"], "image": "page.png", "split": "test"},
        {"question_id": "u1", "question": "What is the total?", "image": "page.png", "split": "test"},
        {"question_id": "l2", "question": "What is it?", "answers": ["a page"], "image": "page.png", "split": "test"},
        {"question_id": "u2", "question": "Who signed it?", "answers": [], "image": "page.png", "split": "test"},
    ]
    (root / "annotations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def unlabeled_test_params(workspace: Path, **overrides):
    """Params evaluating the test split, declared unlabeled; its data prepared and the base model as the trained."""
    params = tiny_params(workspace, **{"data.unlabeled_splits": ["test"], "evaluate.split": "test", **overrides})
    materialize_raw(params.data, params.seed, Path(params.paths.raw))
    preprocess(params)
    shutil.copytree(params.paths.base_model, Path(params.paths.train) / "model")
    return params


def test_evaluate_skips_questions_without_answers(workspace):
    folder = local_test_split(workspace / "documents")
    params = unlabeled_test_params(workspace, **{"data.source": "local", "data.local.path": str(folder)})
    metrics = evaluate(params)

    assert metrics["n_questions"] == metrics["before"]["n_questions"] == 2
    rows = [json.loads(line) for line in (workspace / "reports/predictions.jsonl").read_text().splitlines()]
    assert [row["question_id"] for row in rows] == ["l1", "l2"]


def test_evaluating_a_split_without_answers_is_a_one_line_error(workspace):
    params = unlabeled_test_params(workspace)  # the synthetic test split, its answers withheld
    with pytest.raises(UserError) as failure:
        evaluate(params)
    message = "evaluate.split 'test' has no questions with answers to score; evaluate a labeled split"
    assert str(failure.value) == message
    assert not (workspace / "reports/metrics.json").exists()

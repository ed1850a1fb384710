"""Two CPU processes (accelerate, gloo) follow the loss curve of one process with the same global batch."""

import csv
import shutil

import pytest

from tests.conftest import tiny_params

pytestmark = pytest.mark.slow


def _losses(root):
    with open(root / "reports/train/plots/metrics/train/loss.tsv") as stream:
        return [float(row["loss"]) for row in csv.DictReader(stream, delimiter="\t")]


def test_two_processes_match_one(prepared, tmp_path):
    """The stage launches the processes itself, passing them exactly the params it was called with."""
    from florence_ops.stages.train import train

    curves = {}
    for processes in (1, 2):
        root = tmp_path / f"p{processes}"
        shutil.copytree(prepared, root)
        train(tiny_params(root, **{"train.num_processes": processes, "train.eval_every_epoch": False}))
        curves[processes] = _losses(root)
    assert len(curves[1]) == len(curves[2]) == 2 * 6
    largest = max(abs(a - b) for a, b in zip(curves[1], curves[2]))
    print(f"largest loss difference, 1 vs 2 processes: {largest:.2e}")
    assert largest < 1e-4, (curves[1], curves[2])


def test_evaluation_shared_by_two_processes_matches_one(prepared, tmp_path):
    import json

    from florence_ops.stages.evaluate import evaluate
    from florence_ops.stages.train import train

    root = tmp_path / "ws"
    shutil.copytree(prepared, root)
    train(tiny_params(root, epochs=1, **{"train.eval_every_epoch": False}))
    predictions = {}
    for processes in (1, 2):
        metrics = evaluate(tiny_params(root, epochs=1, **{"evaluate.num_processes": processes}))
        lines = (root / "reports/predictions.jsonl").read_text().splitlines()
        predictions[processes] = [json.loads(line) for line in lines]
        assert metrics["n_questions"] == 16
    assert [r["question_id"] for r in predictions[1]] == [r["question_id"] for r in predictions[2]]
    assert [r["prediction"] for r in predictions[1]] == [r["prediction"] for r in predictions[2]]

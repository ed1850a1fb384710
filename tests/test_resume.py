"""A training run killed with SIGKILL in the middle of a later epoch resumes from its last checkpoint and ends with the
same last weights, bit for bit, as an unbroken run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from florence_ops.config import to_dict
from tests.conftest import tiny_params

pytestmark = pytest.mark.slow
# 48 questions in batches of 8: 6 steps an epoch; checkpoints at steps 4, 6 (epoch end), 8, 12, 16, 18.
OVERRIDES = {"epochs": 3, "train.checkpoint_every": 4, "train.eval_every_epoch": False}


def _kill_in_second_epoch(root, params_file) -> dict:
    """Start `florence-ops train`, SIGKILL it as soon as a checkpoint from the middle of epoch 2 exists."""
    process = subprocess.Popen(
        [sys.executable, "-m", "florence_ops.cli", "train", "--params", str(params_file)],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, "training ended before a checkpoint inside the second epoch"
        assert time.monotonic() < deadline
        found = list((root / "checkpoints").glob("*/last/progress.json"))
        try:
            progress = json.loads(found[0].read_text()) if found else {}
        except (OSError, json.JSONDecodeError):  # being replaced right now
            progress = {}
        if progress.get("epoch") == 1 and progress.get("batches_done"):
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return json.loads(next((root / "checkpoints").glob("*/last/progress.json")).read_text())
        time.sleep(0.005)


def test_killed_run_resumes_and_ends_with_the_same_last_weights(prepared, tmp_path):
    from florence_ops.stages.train import train

    unbroken_root, broken_root = tmp_path / "unbroken", tmp_path / "broken"
    for root in (unbroken_root, broken_root):
        shutil.copytree(prepared, root)
    train(tiny_params(unbroken_root, **OVERRIDES))

    broken = tiny_params(broken_root, **OVERRIDES)
    params_file = broken_root / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(broken)))
    progress = _kill_in_second_epoch(broken_root, params_file)
    assert progress["epoch"] == 1 and 0 < progress["batches_done"] < 6, progress
    assert not (broken_root / "models/train/summary.json").exists()

    train(broken)  # what `dvc repro` does next: the same stage, the same params
    first = load_file(unbroken_root / "models/train/model/model.safetensors")
    second = load_file(broken_root / "models/train/model/model.safetensors")
    assert first.keys() == second.keys()
    differing = [name for name in first if not (first[name] == second[name]).all()]
    assert not differing, f"{len(differing)} tensors differ after resuming, e.g. {differing[:3]}"
    summaries = [json.loads((r / "models/train/summary.json").read_text()) for r in (unbroken_root, broken_root)]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 18
    assert summaries[0]["history"] == summaries[1]["history"]


def test_checkpoint_of_another_run_is_not_resumed(prepared, tmp_path):
    from florence_ops.checkpointing import run_fingerprint

    root = tmp_path / "ws"
    shutil.copytree(prepared, root)
    from florence_ops.stages.train import PARAMS_READ

    assert run_fingerprint(tiny_params(root), PARAMS_READ) != run_fingerprint(tiny_params(root, lr=1e-6), PARAMS_READ)
    assert run_fingerprint(tiny_params(root), PARAMS_READ) == run_fingerprint(tiny_params(root), PARAMS_READ)

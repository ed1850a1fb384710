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
from florence_ops.params_file import apply_overrides, read_yaml
from tests.conftest import REPO, TINY_OVERRIDES, tiny_params

pytestmark = pytest.mark.slow
# 48 questions in batches of 8: 6 steps an epoch; checkpoints at steps 4, 6 (epoch end), 8, 12, 16, 18.
OVERRIDES = {"epochs": 3, "train.checkpoint_every": 4, "train.eval_every_epoch": False}


def _kill_in_second_epoch(root, process: subprocess.Popen, group: bool = False) -> dict:
    """SIGKILL `process` (with `group`, its process group: dvc and the stage it runs) as soon as a checkpoint from the
    middle of epoch 2 exists under `root`; return that checkpoint's progress."""
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
            (os.killpg if group else os.kill)(process.pid, signal.SIGKILL)
            process.wait()
            return json.loads(next((root / "checkpoints").glob("*/last/progress.json")).read_text())
        time.sleep(0.005)


@pytest.mark.parametrize("streaming", [False, True], ids=["global-batches", "streaming"])
def test_killed_run_resumes_and_ends_with_the_same_last_weights(prepared, tmp_path, streaming):
    from florence_ops.stages.train import train

    overrides = {**OVERRIDES, "train.streaming": streaming, "train.vision_cache": not streaming}
    unbroken_root, broken_root = tmp_path / "unbroken", tmp_path / "broken"
    for root in (unbroken_root, broken_root):
        shutil.copytree(prepared, root)
    train(tiny_params(unbroken_root, **overrides))

    broken = tiny_params(broken_root, **overrides)
    params_file = broken_root / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(broken)))
    process = subprocess.Popen(
        [sys.executable, "-m", "florence_ops.cli", "train", "--params", str(params_file)],
        cwd=broken_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    progress = _kill_in_second_epoch(broken_root, process)
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


def _dvc(root, *args, **popen):
    """`dvc <args>` in `root` (this interpreter's dvc, no analytics, no user git config)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    env.update({f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", "test"), ("EMAIL", "test@example.com"))})  # fmt: skip
    command = [sys.executable, "-m", "dvc", *args] if args[0] != "git" else list(args)
    if popen:
        return subprocess.Popen(command, cwd=root, env=env, **popen)
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def _dvc_workspace(root, overrides: dict):
    """A git + DVC repository with this project's dvc.yaml, the package its stages list as deps, and params.yaml with
    `overrides` (dotted keys) applied."""
    shutil.copytree(REPO / "florence_ops", root / "florence_ops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = apply_overrides(read_yaml(REPO / "params.yaml"), overrides)  # YAML 1.2 floats, as the stages read them
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc(root, "git", "init", "-q")
    _dvc(root, "init", "-q")
    _dvc(root, "git", "add", "-A")
    _dvc(root, "git", "commit", "-qm", "workspace")


@pytest.mark.skipif(shutil.which("git") is None or shutil.which("florence-ops") is None, reason="needs git and the CLI")
def test_dvc_repro_after_a_kill_ends_with_the_unbroken_runs_model_and_plots(tmp_path):
    """`dvc repro` of a train stage killed in its second epoch, then `dvc repro` again, as a user recovers: the second
    run resumes from the checkpoint, and the stage's outputs are the unbroken run's, the best model (saved in epoch 1,
    before the kill) and DVCLive's history, step for step. DVC deletes a stage's outputs before running it again.

    lr is so small that no weight moves in float32: every epoch scores the same, so the best model is epoch 1's."""
    overrides = {**TINY_OVERRIDES, "epochs": 3, "lr": 1e-30}
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    for root in (unbroken, broken):
        root.mkdir()
        _dvc_workspace(root, overrides)
        _dvc(root, "repro", "-q", "preprocess")
    _dvc(unbroken, "repro", "-q", "train")

    process = _dvc(broken, "repro", "-q", "train", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   start_new_session=True)  # fmt: skip
    progress = _kill_in_second_epoch(broken, process, group=True)
    assert progress["best_epoch"] == 1, progress  # epochs count from 1
    _dvc(broken, "repro", "-q", "train")

    summary = json.loads((broken / "models/train/summary.json").read_text())
    assert summary["best_epoch"] == 1 and summary["steps"] == 18, summary
    model = "models/train/model/model.safetensors"
    assert (broken / model).read_bytes() == (unbroken / model).read_bytes(), "the resumed stage's model differs"
    for plot in ("train/loss.tsv", "train/lr.tsv", "val/anls.tsv"):
        rows = [(root / "reports/train/plots/metrics" / plot).read_text().splitlines() for root in (unbroken, broken)]
        assert rows[1] == rows[0], f"{plot}: {len(rows[1])} rows after resuming, {len(rows[0])} in the unbroken run"

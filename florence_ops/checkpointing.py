"""Resumable training state, kept apart from the exported model.

A checkpoint is accelerate's state (model, optimizer, scheduler, RNG of every process) plus `progress.json` (epoch,
batches done in it, step, best score, history) and a copy of DVCLive's folder as it was then: `dvc repro` deletes the
train stage's metrics and plots before running it again, and a killed run logs steps past its last checkpoint, so the
run that resumes restores DVCLive's history from the checkpoint. For the same reason the best model so far is kept
beside the checkpoint (`best`) and moved into the stage's output when the run ends.

A checkpoint lives under `paths.checkpoints/<fingerprint>/last`, where the fingerprint covers everything that makes
two runs the same run (training params, data, base model): a run resumes only its own state, never one left by a run
with another learning rate. Writes go to a temporary folder that is renamed into place, so a run killed mid-write
leaves the previous checkpoint whole. With several machines `paths.checkpoints` is a folder all of them reach (a
shared file system): each process saves its own RNG state there, and any machine's rerun resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from florence_ops.config import Params, pick
from florence_ops.launch import writes_outputs

log = logging.getLogger(__name__)

LIVE = "dvclive"  # DVCLive's folder inside a checkpoint


def run_fingerprint(params: Params, keys: tuple[str, ...], ignore: tuple[str, ...] = ()) -> str:
    """Digest of what determines the training run: its params (`keys`, less the dotted `ignore` keys inside them,
    which do not change what is computed) and the identity of its inputs."""
    picked = pick(params, keys)
    for key in ignore:
        section, name = key.rsplit(".", 1)
        picked.get(section, {}).pop(name, None)
    digest = hashlib.sha256(json.dumps(picked, sort_keys=True).encode())
    for folder in (params.paths.processed, params.paths.base_model):
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}".encode())
    for small in ("train.parquet", "validation.parquet"):
        path = Path(params.paths.processed) / small
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class CheckpointStore:
    """The `last` checkpoint of one run: save atomically, find, load, and delete once the run is done."""

    def __init__(self, root: str | Path, fingerprint: str, live: str | Path | None = None):
        self.folder = Path(root) / fingerprint
        self.last = self.folder / "last"
        self.previous = self.folder / "last.previous"
        self.live = None if live is None else Path(live)  # DVCLive's folder, saved with each checkpoint
        self.best = self.folder / "best"  # the run's best model so far (written by the train stage)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, if any (a rename interrupted halfway leaves `last.previous`)."""
        for candidate in (self.last, self.previous):
            if (candidate / "progress.json").exists():
                return candidate
        return None

    def save(self, accelerator, progress: dict[str, Any]) -> Path:
        """Write accelerate's state and `progress` to `last`, replacing the previous checkpoint atomically.

        The process that writes the stage's outputs (`launch.writes_outputs`) adds DVCLive's folder, which lives on its
        machine, and renames the folder once every process has saved its part."""
        start = time.perf_counter()
        tmp = self.folder / f".tmp-{progress['step']}"
        writer = writes_outputs(accelerator)
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # the global main process (weights) may be on another machine
        if writer:
            if self.live is not None and self.live.is_dir():
                shutil.copytree(self.live, tmp / LIVE)
            (tmp / "progress.json").write_text(json.dumps(progress, indent=2))
            if self.last.exists():
                shutil.rmtree(self.previous, ignore_errors=True)
                os.replace(self.last, self.previous)
            os.replace(tmp, self.last)
            shutil.rmtree(self.previous, ignore_errors=True)
        accelerator.wait_for_everyone()
        if writer:
            log.info("checkpoint of step %d saved in %.1f s", progress["step"], time.perf_counter() - start)
        return self.last

    def restore_live(self, checkpoint: Path) -> None:
        """Put DVCLive's folder back as `checkpoint` saved it (main process; before DVCLive opens it to resume)."""
        saved = checkpoint / LIVE
        if self.live is None or not saved.is_dir():
            return
        shutil.rmtree(self.live, ignore_errors=True)
        shutil.copytree(saved, self.live)

    def load(self, accelerator, checkpoint: Path) -> dict[str, Any]:
        """Restore accelerate's state from `checkpoint` and return its progress record."""
        accelerator.load_state(str(checkpoint))
        return self.progress(checkpoint)

    @staticmethod
    def progress(checkpoint: Path) -> dict[str, Any]:
        """The progress record of `checkpoint` (epoch, batches done, step, best score, history)."""
        return json.loads((checkpoint / "progress.json").read_text())

    def clear(self) -> None:
        """Delete this run's checkpoints (called when the run has finished and its model is saved)."""
        shutil.rmtree(self.folder, ignore_errors=True)

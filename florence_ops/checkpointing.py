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

Saves are written off the training path (`BackgroundWrites`): what a checkpoint or the best model holds is copied to
host buffers kept from save to save (page-locked on a GPU machine), then written and renamed into place on one thread
while the next steps run. The files are those accelerate's `save_state` writes, with the RNG states taken when the
save was asked for, so a resume is bit-exact. Sharded states (FSDP, DeepSpeed) gather through collectives and are
saved in place, as before.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any

import torch

from florence_ops.config import Params, pick
from florence_ops.launch import writes_outputs

log = logging.getLogger(__name__)

LIVE = "dvclive"  # DVCLive's folder inside a checkpoint
MAX_PENDING = 2  # queued writes (each holding its host copy) before queueing another waits for the oldest


def host_copy(tree, buffers: list[torch.Tensor]):
    """`tree` (a state dict, an optimizer's nested one) with every tensor copied into the host tensors `buffers` held
    from the last call with that list (empty the first time), page-locked when they come from a GPU; tensors of
    another shape or dtype get new ones. Tensors that share storage (tied weights) still share it in the copy. A save
    then costs a device-to-host copy, not a fresh allocation."""
    seen: dict[tuple, torch.Tensor] = {}
    devices: set[torch.device] = set()

    def copy_tensor(t: torch.Tensor) -> torch.Tensor:
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            return seen[key]
        index, pinned = len(seen), t.is_cuda
        kept = buffers[index] if index < len(buffers) else None
        if kept is None or kept.shape != t.shape or kept.dtype != t.dtype or kept.is_pinned() != pinned:
            buffers[index : index + 1] = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)]
        seen[key] = buffers[index].copy_(t.detach(), non_blocking=pinned)
        if pinned:
            devices.add(t.device)
        return seen[key]

    def walk(value):
        if isinstance(value, torch.Tensor):
            return copy_tensor(value)
        if isinstance(value, dict):
            return type(value)((k, walk(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v) for v in value)
        return copy.deepcopy(value)

    copied = walk(tree)
    for device in devices:  # the copies were queued on each GPU's stream: wait until they have landed
        torch.cuda.synchronize(device)
    return copied


class BackgroundWrites:
    """Writes to disk on one thread while training goes on, in the order they were queued.

    A write must only read what was copied for it (`copy`), so training may change the live state at once. Each kind
    of save (the checkpoint's weights, its optimizer state, the best model) has its own host buffers, kept from save
    to save (page-locked when copied from a GPU); copying into them first waits for the write that read them last.
    At most `MAX_PENDING` writes wait or run: queueing another first waits for the oldest. A write's error is raised
    by the first `queue` or `wait` after it ended, so a failed save fails the run as a synchronous one would. The
    buffers stay until `close`: page-locked, about 4.4 GiB for Florence-2-base (the weights twice, AdamW's moments)
    and 9.4 GiB for -large, the allocator rounding each tensor up to a power of two.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="florence-ops-save")
        self._pending: list[Future] = []
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._readers: dict[str, Future] = {}  # the write that reads each kind's buffers

    def copy(self, kind: str, tree) -> tuple[Any, float]:
        """`tree` copied into the host buffers of `kind` (`host_copy`); returns it and the seconds spent waiting for
        the write that read those buffers last."""
        start = time.perf_counter()
        reader = self._readers.pop(kind, None)
        if reader is not None:
            futures_wait([reader])  # its error, if any, is raised by the next queue or wait
        waited = time.perf_counter() - start
        return host_copy(tree, self._buffers.setdefault(kind, [])), waited

    def queue(self, write: Callable[[], None], reads: tuple[str, ...] = ()) -> float:
        """Queue `write`, which reads the host buffers of the kinds in `reads`; returns the seconds spent waiting for
        an earlier write to make room."""
        start = time.perf_counter()
        while self._pending and (self._pending[0].done() or len(self._pending) >= MAX_PENDING):
            self._pending.pop(0).result()  # a finished write's error is raised here
        future = self._pool.submit(write)
        self._pending.append(future)
        self._readers.update(dict.fromkeys(reads, future))
        return time.perf_counter() - start

    def wait(self) -> float:
        """Wait for every queued write; returns the seconds waited."""
        start = time.perf_counter()
        while self._pending:
            self._pending.pop(0).result()
        return time.perf_counter() - start

    def close(self) -> float:
        """Wait for every queued write, then give the host buffers back; returns the seconds waited."""
        try:
            return self.wait()
        finally:
            self._buffers.clear()
            self._readers.clear()
            self._pool.shutdown()


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

    def __init__(self, root: str | Path, fingerprint: str, live: str | Path | None = None,
                 writes: BackgroundWrites | None = None):  # fmt: skip
        self.writes = writes  # None: every save is written before `save` returns
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

    def save(self, accelerator, progress: dict[str, Any], state: tuple | None = None) -> Path:
        """Write accelerate's state and `progress` to `last`, replacing the previous checkpoint atomically.

        The process that writes the stage's outputs (`launch.writes_outputs`) adds DVCLive's folder, which lives on its
        machine, and `progress`. Accelerate's global main process writes the weights, which may be on another machine.
        With `writes` and the prepared `state` (model, optimizer, scheduler) of an unsharded run, that process copies
        the weights, optimizer and scheduler to host memory and writes them in the background, then renames the
        folder into place (`last` appears when it is written); the RNG states, DVCLive's folder and `progress` are
        taken now. Otherwise the writing process renames the folder once every process has saved its part."""
        start, waited = time.perf_counter(), 0.0
        tmp = self.folder / f".tmp-{progress['step']}"
        writer = writes_outputs(accelerator)
        later = self.writes is not None and state is not None and not _sharded(accelerator)
        owner = accelerator.is_main_process if later else writer  # clears `tmp`, renames it into place
        if owner:
            if later and tmp.exists():  # this step saved twice (an epoch's end): the first goes first
                waited += self.writes.wait()
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        if later:
            _save_rng_states(accelerator, tmp)
        else:
            accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # the global main process (weights) may be on another machine
        if writer:
            if self.live is not None and self.live.is_dir():
                shutil.copytree(self.live, tmp / LIVE)
            (tmp / "progress.json").write_text(json.dumps(progress, indent=2))
        accelerator.wait_for_everyone()
        if owner:
            if later:
                copies, copying_waited = _state_copies(accelerator, *state, self.writes)
                waited += copying_waited
                waited += self.writes.queue(lambda: self._finish(tmp, progress["step"], copies), STATE_KINDS)
            else:
                self._publish(tmp)
        accelerator.wait_for_everyone()
        if owner:
            how = f" (waited {waited:.1f} s for an earlier save; written in the background)" if later else ""
            log.info("checkpoint of step %d saved in %.1f s%s", progress["step"], time.perf_counter() - start, how)
        return self.last

    def wait(self) -> None:
        """Return once every checkpoint and model queued for writing is on disk (the run's end: the writes' host
        buffers are given back)."""
        if self.writes is not None:
            waited = self.writes.close()
            log.info("saves written %.1f s after the last step", waited)

    def _finish(self, tmp: Path, step: int, copies: dict[str, Any]) -> None:
        from accelerate.utils import save

        start = time.perf_counter()
        for name, value in copies.items():
            save(value, tmp / name, safe_serialization=name.endswith(".safetensors"))
        self._publish(tmp)
        log.info("checkpoint of step %d written in %.1f s, off the training path", step, time.perf_counter() - start)

    def _publish(self, tmp: Path) -> None:
        if self.last.exists():
            shutil.rmtree(self.previous, ignore_errors=True)
            os.replace(self.last, self.previous)
        os.replace(tmp, self.last)
        shutil.rmtree(self.previous, ignore_errors=True)

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


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                            DistributedType.MEGATRON_LM)  # fmt: skip


def _save_rng_states(accelerator, folder: Path) -> None:
    """This process's RNG states and step, as `save_state` records them, written now into `folder`."""
    from accelerate.checkpointing import save_accelerator_state

    folder.mkdir(parents=True, exist_ok=True)
    save_accelerator_state(str(folder), [], [], [], [], accelerator.process_index, accelerator.step, accelerator.scaler)


STATE_KINDS = ("checkpoint weights", "checkpoint optimizer")  # host buffers of a checkpoint's background write


def _state_copies(accelerator, model, optimizer, scheduler, writes: BackgroundWrites) -> tuple[dict[str, Any], float]:
    """What `save_state` writes for one unsharded model, optimizer and scheduler, under its file names, in the host
    buffers of `writes`; and the seconds spent waiting for those buffers."""
    from accelerate.utils.constants import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, SCHEDULER_NAME

    # save_state saves the model as prepare() received it: under DDP the module inside the wrapper
    weights, waited_weights = writes.copy(STATE_KINDS[0], accelerator.get_state_dict(model))
    optimizer_state, waited_optimizer = writes.copy(STATE_KINDS[1], optimizer.state_dict())
    copies = {SAFE_WEIGHTS_NAME: weights, f"{OPTIMIZER_NAME}.bin": optimizer_state,
              f"{SCHEDULER_NAME}.bin": copy.deepcopy(scheduler.state_dict())}  # fmt: skip
    return copies, waited_weights + waited_optimizer

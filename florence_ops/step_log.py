"""Each training step's loss on its way to the host, read one step late, checked and logged with its throughput."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from florence_ops.errors import UserError


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class StepLoss:
    """A step's loss on its way to the host: the copy is queued behind the step, and `value()` waits for it alone.

    The loop reads each step's loss after queueing the next step, so the host never waits for the device to drain
    (which would leave the device idle while the host sets up the next step); a non-finite loss is still caught
    before anything is saved, one step later.
    """

    def __init__(self, loss: torch.Tensor):
        self.loss, self.ready = loss.detach(), None
        if self.loss.is_cuda:
            self.loss = self.loss.to("cpu", non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def value(self) -> float:
        """The loss, once the step has computed it."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.loss.item()


class Throughput:
    """Samples per second and peak GPU memory between two log points."""

    def __init__(self):
        self.start, self.samples = time.perf_counter(), 0

    def add(self, samples: int) -> None:
        """Count samples processed since the last reading."""
        self.samples += samples

    def read(self, device: torch.device) -> dict[str, float]:
        """Rate since the last reading, and peak memory so far; restarts the clock."""
        now = time.perf_counter()
        rate = self.samples / max(now - self.start, 1e-9)
        self.start, self.samples = now, 0
        out = {"samples_per_s": rate}
        if device.type == "cuda":
            out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out


class StepLog:
    """Reads, checks and logs each step's loss one step late (see `StepLoss`): to DVCLive (`live`, or None) and the
    progress bar. `flush` reads the last one, before anything is saved or validated. A non-finite loss raises
    `TrainingDiverged`, naming `checkpoints`, where the last good checkpoint stays."""

    def __init__(self, live, bar, device: torch.device, checkpoints: Path):
        self.live, self.bar, self.device, self.checkpoints = live, bar, device, checkpoints
        self.meter, self.pending = Throughput(), None

    def queued(self, loss: StepLoss, epoch: int, step: int, samples: int, lr: float) -> None:
        """Record a step just queued, and read the one before it."""
        self.flush()
        self.pending = (loss, epoch, step, samples, lr)

    def flush(self) -> None:
        """Read, check and log the step not yet read, if any."""
        if self.pending is None:
            return
        (loss, epoch, step, samples, lr), self.pending = self.pending, None
        value = loss.value()
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"training loss is {value} at epoch {epoch + 1}, step {step}: stopped; the last good checkpoint "
                f"stays in {self.checkpoints} (lower lr, or check the data)"
            )
        self.meter.add(samples)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{value:.3f}", epoch=epoch)
        _log_step(self.live, value, lr, self.meter.read(self.device))


def _log_step(live, loss: float, lr: float, rates: dict[str, float]) -> None:
    if live is None:
        return
    live.log_metric("train/loss", loss)
    live.log_metric("train/lr", lr)
    for name, value in rates.items():
        live.log_metric(f"train/{name}", value)
    live.next_step()

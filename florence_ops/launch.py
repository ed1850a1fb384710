"""Start a stage in several processes through `accelerate launch` (one per GPU; gloo processes on a CPU machine)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from florence_ops.config import to_dict
from florence_ops.errors import UserError

log = logging.getLogger(__name__)
LAUNCHED = "FLORENCE_OPS_LAUNCHED"  # set for the processes started here, so they run the stage, not launch again


def needs_launch(num_processes: int, distributed: str = "ddp") -> bool:
    """True when the stage should start processes through accelerate rather than run in this one: several processes,
    or FSDP (which needs a launched process group even for one)."""
    return (num_processes > 1 or distributed == "fsdp") and LAUNCHED not in os.environ


def launch(stage: str, params, num_processes: int, fsdp: bool = False) -> None:
    """Run `florence-ops <stage>` in `num_processes` processes and wait for them.

    `--multi_gpu` starts the processes through torchrun; on a machine without CUDA the same launch gives CPU
    processes that talk over gloo (accelerate's `--cpu` would start a single process without mpirun).
    """
    # FSDP keeps the original parameters: frozen and trainable ones share its flat parameters (frozen tower, LoRA).
    mode = ["--use_fsdp", "--fsdp_use_orig_params", "true"] if fsdp else ["--multi_gpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(num_processes)]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # the stage sets these itself
    with tempfile.TemporaryDirectory(prefix="florence-ops-launch-") as folder:
        # the launched processes read exactly these params (also when the stage was called with params in memory)
        params_file = Path(folder) / "params.yaml"
        params_file.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
        cmd += ["-m", "florence_ops.cli", stage, "--params", str(params_file)]
        log.info("launching: %s", " ".join(cmd))
        done = subprocess.run(cmd, env={**os.environ, LAUNCHED: "1"})
    if done.returncode:
        raise UserError(f"`florence-ops {stage}` failed in its {num_processes} launched process(es) "
                        f"(exit {done.returncode}); the error is in the output above")  # fmt: skip

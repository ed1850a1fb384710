"""Start a stage in several processes through `accelerate launch` (one per GPU; gloo processes on a CPU machine), on
one machine or, for training, on several (torchrun's c10d rendezvous at machine rank 0's address)."""

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
MACHINE_RANK = "FLORENCE_OPS_MACHINE_RANK"  # this machine's rank, for the processes started here
RENDEZVOUS_ADDRESS = "MASTER_ADDR"  # where `train.main_process_ip: null` looks, as Slurm scripts and torchrun set it


def needs_launch(num_processes: int, distributed: str = "ddp", num_machines: int = 1) -> bool:
    """True when the stage should start processes through accelerate rather than run in this one: several processes
    or machines, or FSDP (which needs a launched process group even for one)."""
    return (num_processes > 1 or num_machines > 1 or distributed == "fsdp") and LAUNCHED not in os.environ


def machine_rank() -> int:
    """The rank of the machine this process was launched on (0 when not launched on several machines)."""
    return int(os.environ.get(MACHINE_RANK, "0"))


def writes_outputs(accelerator) -> bool:
    """True for the one process that writes the stage's outputs (DVC outputs, DVCLive, the trained model): the first
    process of machine rank 0, where `dvc repro` runs. With several machines it need not be accelerate's global main
    process: c10d's rendezvous numbers the machines in its own order (by host name), not by machine rank."""
    return accelerator.is_local_main_process and machine_rank() == 0


def rendezvous_arguments(train, rank: int) -> list[str]:
    """`accelerate launch` arguments that join this machine (`rank`, in 0..num_machines-1) to the others of
    `train.num_machines`."""
    address = train.main_process_ip or os.environ.get(RENDEZVOUS_ADDRESS)
    if not address:
        raise UserError(f"train.main_process_ip is null and ${RENDEZVOUS_ADDRESS} is unset: set either to the address "
                        "of machine rank 0, which every machine can reach")  # fmt: skip
    # Machine rank 0 hosts the rendezvous store: said explicitly, as an address that is not this host's name (a
    # Kubernetes service, several launchers on one host) would leave no machine or two hosting it.
    host = "true" if rank == 0 else "false"
    return ["--num_machines", str(train.num_machines), "--machine_rank", str(rank), "--main_process_ip", address,
            "--main_process_port", str(train.main_process_port), "--rdzv_backend", "c10d",
            "--rdzv_conf", f"is_host={host}"]  # fmt: skip


def launch(stage: str, params, num_processes: int, fsdp: bool = False, rank: int | None = None) -> None:
    """Run `florence-ops <stage>` in `num_processes` processes on this machine and wait for them; with `rank`, as
    machine `rank` of `train.num_machines`, whose processes all train together.

    `--multi_gpu` starts the processes through torchrun; on a machine without CUDA the same launch gives CPU
    processes that talk over gloo (accelerate's `--cpu` would start a single process without mpirun).
    """
    # FSDP keeps the original parameters: frozen and trainable ones share its flat parameters (frozen tower, LoRA).
    mode = ["--use_fsdp", "--fsdp_use_orig_params", "true"] if fsdp else ["--multi_gpu"]
    machines = ["--num_machines", "1"] if rank is None else rendezvous_arguments(params.train, rank)
    total = num_processes * (1 if rank is None else params.train.num_machines)  # accelerate counts all machines'
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(total), *machines]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # the stage sets these itself
    with tempfile.TemporaryDirectory(prefix="florence-ops-launch-") as folder:
        # the launched processes read exactly these params (also when the stage was called with params in memory)
        params_file = Path(folder) / "params.yaml"
        params_file.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
        cmd += ["-m", "florence_ops.cli", stage, "--params", str(params_file)]
        log.info("launching: %s", " ".join(cmd))
        done = subprocess.run(cmd, env={**os.environ, LAUNCHED: "1", MACHINE_RANK: str(rank or 0)})
    if done.returncode and rank is None:
        raise UserError(f"`florence-ops {stage}` failed in its {num_processes} launched process(es) "
                        f"(exit {done.returncode}); the error is in the output above")  # fmt: skip
    if done.returncode:
        raise UserError(f"`florence-ops {stage}` failed on machine rank {rank} (exit {done.returncode}): the error is "
                        "in the output above, or on another machine if it was lost; run every machine's command "
                        "again to resume from the last checkpoint")  # fmt: skip

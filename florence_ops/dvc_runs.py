"""The flow's one way to run DVC: `dvc <args>` as a Prefect task, its output in the run log, what it did per stage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from florence_ops.processes import dies_with_this_process

# How `dvc repro` / `dvc exp run` say what they did with each stage
STAGE_OUTCOMES = {
    "ran": re.compile(r"^Running stage '([^']+)'"),
    "restored": re.compile(r"^Stage '([^']+)' is cached - skipping run"),  # from the run-cache
    "unchanged": re.compile(r"^Stage '([^']+)' didn't change, skipping"),
}


class PipelineFailed(RuntimeError):
    """A `dvc` command exited with an error."""


def stage_outcomes(lines: list[str]) -> dict[str, list[str]]:
    """The stages that `dvc repro` output says it ran, restored from the run-cache, or found unchanged."""
    outcomes: dict[str, list[str]] = {name: [] for name in STAGE_OUTCOMES}
    for line in lines:
        for name, pattern in STAGE_OUTCOMES.items():
            if match := pattern.match(line.strip()):
                outcomes[name].append(match.group(1))
    return outcomes


@task(name="dvc", cache_policy=NO_CACHE)
def run_dvc(args: list[str], repo: Path) -> dict[str, list[str]]:
    """Run `dvc <args>` in `repo`, streaming its output to the run log; PipelineFailed on a non-zero exit.

    Returns the stages it ran, restored from the run-cache and found unchanged (see `stage_outcomes`). The error
    quotes DVC's first ERROR line (its last line is often an invitation to ask for help), else its last line.
    """
    logger = get_run_logger()
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # the stages import this checkout's package, whatever checkout the environment was installed from
    python_path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PATH": path, "PYTHONPATH": python_path}
    env.setdefault("DVC_NO_ANALYTICS", "1")
    # dvc and the stages it starts, in a group of their own that stops when this process dies or is stopped
    command = [sys.executable, "-m", "florence_ops.processes", sys.executable, "-m", "dvc", *args]
    logger.info("$ dvc %s", " ".join(args))
    lines: list[str] = []
    with subprocess.Popen(
        command,
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        preexec_fn=dies_with_this_process(),
    ) as process:
        try:
            for line in process.stdout or ():
                logger.info(line.rstrip())
                lines.append(line)
        except BaseException:  # interrupted: do not leave dvc running on its own, holding DVC's lock
            process.terminate()
            raise
    if process.returncode:
        said = [line.strip() for line in lines if line.strip()]
        cause = next((line for line in said if line.startswith("ERROR")), said[-1] if said else "no output")
        raise PipelineFailed(f"`dvc {' '.join(args)}` exited with {process.returncode}: {cause}")
    return stage_outcomes(lines)

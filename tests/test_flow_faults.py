"""Killing `python flows/retrain.py`: its temporary Prefect server dies with it, and the next run records the killed
run as crashed and says which run it was.

Real processes: the flow runs in a temporary DVC repository whose one stage blocks, the first time, until the test
kills the flow; the next time it writes what the pipeline would (metrics and an exported model). Every process a test
starts is in its own process group, killed at the end whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from florence_ops.params_file import read_yaml

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120  # the first start of a temporary server migrates a new database: 7-16 s here
STAGE = """
import json, time
from pathlib import Path
from florence_ops.config import load_params

if not Path("started").exists():  # the first run: block until the test kills the flow
    Path("started").touch()
    time.sleep(600)
paths = load_params("params.yaml").paths
Path(paths.reports).mkdir(parents=True, exist_ok=True)
Path(paths.reports, "metrics.json").write_text(json.dumps({"anls": 0.5, "n_questions": 1, "before": {"anls": 0.0}}))
Path(paths.export).mkdir(parents=True, exist_ok=True)
Path(paths.export, "model.safetensors").write_text("weights")
"""


@dataclass
class FlowRun:
    """A `python flows/retrain.py` process and what the test learnt about it."""

    repo: Path
    process: subprocess.Popen
    log: Path
    servers: list[psutil.Process] = field(default_factory=list)  # its temporary Prefect server(s)
    others: list[psutil.Process] = field(default_factory=list)  # its other descendants: dvc, the stage
    ports: list[int] = field(default_factory=list)  # where they listened
    lock_note: str = ""  # what it wrote into the pipeline lock file
    other_commands: list[str] = field(default_factory=list)  # the command lines of `others`
    survivors: list[str] = field(default_factory=list)  # its processes still running 10 s after it was killed

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def flow_repo(tmp: Path) -> Path:
    """A DVC repository (no git) holding the project's code and params, with the blocking stage as its pipeline."""
    repo = tmp / "repo"
    repo.mkdir()
    for name in ("florence_ops", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = read_yaml(ROOT / "params.yaml")
    params["data"]["source"], params["model"]["name"] = "synthetic", "tiny"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text("stages:\n  pipeline:\n    cmd: python stage.py\n")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=repo, check=True, capture_output=True)
    return repo


def start_flow(repo: Path, log: Path, prefect_home: Path) -> FlowRun:
    """`python flows/retrain.py` in `repo` without PREFECT_API_URL (so with a temporary server), in a new session."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(prefect_home), PYTHONPATH=str(repo), DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=str(START_TIMEOUT_S))  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "flows/retrain.py"], cwd=repo, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return FlowRun(repo, process, log)


def wait_until_blocked(run: FlowRun) -> None:
    """Wait until the run is in its blocking stage; note its Prefect server(s), their ports and the lock note."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (run.repo / "started").exists():
        assert run.process.poll() is None, f"the flow ended first:\n{run.output()[-3000:]}"
        assert time.monotonic() < deadline, f"the stage did not start:\n{run.output()[-3000:]}"
        time.sleep(0.2)
    children = psutil.Process(run.process.pid).children(recursive=True)
    run.servers = [p for p in children if "prefect" in " ".join(p.cmdline())]  # not dvc, not the stage
    run.others = [p for p in children if p not in run.servers]
    run.other_commands = [" ".join(p.cmdline()) for p in run.others]
    listening = (c for p in run.servers for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
    run.ports = sorted({c.laddr.port for c in listening})
    run.lock_note = (run.repo / ".florence-ops.lock").read_text().strip()


def still_running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def assert_servers_gone(run: FlowRun, within_s: float = 10) -> None:
    assert len(run.servers) == 1 and run.ports, f"expected one temporary Prefect server: {run.servers}"
    deadline = time.monotonic() + within_s
    while any(map(still_running, run.servers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [" ".join(p.cmdline()) for p in run.servers if still_running(p)]
    assert alive == [], f"the temporary Prefect server outlived its flow process: {alive}"
    assert [port for port in run.ports if answers(port)] == []


def kill_group(run: FlowRun) -> None:
    """Kill everything the run started (the server, dvc, the stage), whatever state the test left it in."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.process.pid, signal.SIGKILL)
    for process in run.servers + run.others:  # in case one left the group
        if still_running(process):
            process.kill()
    run.process.wait()


def history(repo: Path) -> dict[str, dict]:
    entries = (json.loads(p.read_text()) for p in sorted((repo / "reports" / "history").glob("*.json")))
    return {entry["run_id"]: entry for entry in entries}


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One PREFECT_HOME for the module's runs: the first server start migrates its database, the others need not."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, prefect_home):
    """A run killed (SIGKILL) in its pipeline stage, its other processes left to their fate for 10 s; then those still
    running are noted in `survivors` and killed, so that the next run finds the pipeline free."""
    tmp = tmp_path_factory.mktemp("killed")
    run = start_flow(flow_repo(tmp), tmp / "killed.log", prefect_home)
    try:
        wait_until_blocked(run)
        run.process.kill()
        run.process.wait()
        deadline = time.monotonic() + 10
        while any(map(still_running, run.servers + run.others)) and time.monotonic() < deadline:
            time.sleep(0.1)
        run.survivors = [str(p.pid) for p in run.servers + run.others if still_running(p)]
        for process in run.others:
            if still_running(process):
                process.kill()
        yield run
    finally:
        kill_group(run)


@pytest.fixture(scope="module")
def next_run(killed_run, prefect_home):
    """The run after the killed one, to its end, in the same repository."""
    run = start_flow(killed_run.repo, killed_run.log.with_name("next.log"), prefect_home)
    try:
        run.process.wait(timeout=START_TIMEOUT_S + 60)
        yield run
    finally:
        kill_group(run)


def test_killed_flow_leaves_no_temporary_prefect_server(killed_run):
    assert_servers_gone(killed_run)


def test_killed_flow_leaves_no_dvc_or_stage_running(killed_run):
    assert any("stage.py" in command for command in killed_run.other_commands), killed_run.other_commands
    assert killed_run.survivors == [], f"the pipeline outlived its flow process: {killed_run.other_commands}"


def test_a_run_that_ends_stops_its_server_after_its_last_log(next_run):
    assert next_run.process.returncode == 0, next_run.output()[-3000:]
    assert "Error logging to API" not in next_run.output()


def test_next_run_records_the_killed_run_as_crashed(killed_run, next_run):
    killed_id = killed_run.lock_note.rpartition("run ")[2]
    entries = history(killed_run.repo)
    assert killed_id in entries, f"no history entry for the killed run {killed_id}: {sorted(entries)}"
    crashed = entries.pop(killed_id)
    assert (crashed["status"], crashed["decision"], crashed["finished_at"]) == ("crashed", "rejected", None)
    [(next_id, latest)] = entries.items()
    assert crashed["reason"].startswith("the run stopped before it finished") and crashed["reason"].endswith(next_id)
    assert (latest["status"], latest["decision"]) == ("completed", "promoted")


def test_next_run_says_which_run_was_killed_holding_the_lock(killed_run, next_run):
    assert killed_run.lock_note.startswith(f"pid {killed_run.process.pid}, run ")
    line = f"the previous holder of the pipeline ({killed_run.lock_note}) was killed"
    assert line in next_run.output(), next_run.output()[-3000:]


def test_terminated_flow_leaves_no_temporary_prefect_server(tmp_path, prefect_home):
    run = start_flow(flow_repo(tmp_path), tmp_path / "terminated.log", prefect_home)
    try:
        wait_until_blocked(run)
        run.process.terminate()
        run.process.wait(timeout=60)
        assert_servers_gone(run)
        [entry] = history(run.repo).values()
        assert entry["status"] == "failed" and entry["error"].startswith("TerminationSignal")
    finally:
        kill_group(run)

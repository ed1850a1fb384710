"""Rehearse retraining on a pool of machines, on one host: two Prefect workers play two machines that share nothing
but the remotes (a bare git repository, an S3 server as the DVC remote) and the Prefect server.

1. Two runs at once: one takes the pool's slot, trains and is promoted; the other waits for the slot, then skips
   training: the version holding prod in the registry was trained on the same data and params.
2. A machine dies (its worker and everything it started SIGKILLed) while training a changed params.yaml: the slot
   frees when its lease expires, the remotes are unchanged, and the next run trains and succeeds. The killed run,
   which can no longer report its end, is marked Crashed by the automation of `flows/automations.yaml` once its
   heartbeats stop.
Once the first phase has put a version in prod, two serving replicas start (`pool_replicas.py`: each in its own
directory, following `registry:florence-docvqa#prod` on the git remote, fetching from S3), and a client asks both
until the end. The second phase's promotion is swapped in by both without a failed request.
3. A version whose weights are corrupt in the S3 bucket takes prod: both replicas keep serving theirs and report the
   failed fetch in /healthz.
4. The S3 server stops while a run pushes (it restored every stage from the run-cache the second phase pushed): the
   run fails with one line naming the DVC remote; nothing is committed or promoted.

Writes JSON with the timings, which worker trained and which waited. From the repository root:

    PYTHONPATH=. python benchmarks/pool_rehearsal.py --set epochs=2 --set promotion.margin=-1 \\
        --out reports/benchmarks/pool_rehearsal_cpu.json

(the tests run it with their tiny params: tests/test_pool.py). A negative margin lets the gate promote the tiny
model, which learns nothing in two epochs: the first and second phases need a promotion.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import pool_machines as machines  # noqa: E402
from benchmarks import pool_replicas as replicas  # noqa: E402
from florence_ops.artifacts import write_json  # noqa: E402
from florence_ops.params_file import apply_overrides, parse_value, read_yaml  # noqa: E402

DEPLOYMENT = "florence-retrain/scheduled"
RUN_TIMEOUT_S = 900


def trigger(n: int = 1) -> list[str]:
    """Start `n` runs of the deployment now; their ids."""
    from prefect.deployments import run_deployment

    return [str(run_deployment(DEPLOYMENT, timeout=0, as_subflow=False).id) for _ in range(n)]


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def state(run_id: str):
    with _client() as client:
        return client.read_flow_run(run_id).state


def wait_finished(run_ids: list[str]) -> None:
    machines.wait_for(lambda: all(state(i).is_final() for i in run_ids), f"runs {run_ids}", RUN_TIMEOUT_S, 2)


def logs(run_id: str) -> list[str]:
    """The run's log messages on the Prefect server. A finished run's last lines reach the server after its state
    does (the flow's process ships logs in batches), so this waits for the flow's own "Finished in state" line."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    def read() -> list:
        with _client() as client:
            of_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
            return client.read_logs(of_run, limit=200) + client.read_logs(of_run, limit=200, offset=200)

    def shipped(entries: list) -> bool:
        return any(e.task_run_id is None and e.message.startswith("Finished in state") for e in entries)

    def read_shipped() -> list | None:
        entries = read()
        return entries if shipped(entries) else None

    found = read()
    if state(run_id).is_final() and not shipped(found):
        found = machines.wait_for(read_shipped, f"the last logs of run {run_id}", 60, 1)
    return [entry.message for entry in found]


def decision(run_id: str) -> tuple[str | None, str | None]:
    """The decision ("promoted", "skipped", ...) and the reason of the run's markdown artifact; Nones without one."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        of_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        found = client.read_artifacts(artifact_filter=of_run)
    pattern = r"`: (\w+) \(\w+\)\n\n(.*)"
    match = next((re.search(pattern, a.data or "") for a in found if a.key == "florence-retrain"), None)
    return (match.group(1), match.group(2) or None) if match else (None, None)


def matches(lines: list[str], pattern: str) -> list[str]:
    """The first group of `pattern` in each line that starts with a match, sorted, once each."""
    return sorted({m.group(1) for line in lines if (m := re.match(pattern, line))})


def ran_on(machine: Path, run_id: str) -> bool:
    """Whether the run's flow ran on `machine` (its worker log shows the run's start; a worker may be offered a run
    that another takes)."""
    return f"/flow-run/{run_id}" in (machine / "worker.log").read_text(errors="replace")


def summary(run_id: str, root: Path) -> dict:
    """What a run did, from the Prefect server (state, logs, artifact) and the workers' logs."""
    lines = logs(run_id)
    waited = next((m.group(1) for line in lines if (m := re.search(r"slot after waiting ([\d.]+) s", line))), None)
    branch = next((m.group(1) for line in lines if (m := re.search(r"committed the run to (\S+)", line))), None)
    final, (decided, reason) = state(run_id), decision(run_id)
    return {
        "run_id": run_id,
        "worker": next((w.name for w in root.glob("machine-*") if ran_on(w, run_id)), None),
        "state": final.type.value,
        "message": final.message,
        "slot_wait_s": float(waited) if waited else None,
        "stages_ran": matches(lines, r"Running stage '([^']+)'"),
        "stages_restored": matches(lines, r"Stage '([^']+)' is cached"),
        "branch": branch,
        "decision": decided,
        "reason": reason,
    }


def change_params_on_main(seed: Path, key: str, value) -> None:
    """Commit a params.yaml change to main and push it, as a user would."""
    params = apply_overrides(read_yaml(seed / "params.yaml"), {key: value})
    (seed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    machines.git(seed, "commit", "-q", "-am", f"params: {key}={value}")
    machines.git(seed, "push", "-q", "origin", "main")


def descendants_running(worker, *words: str) -> bool:
    """Whether a process under `worker` has every one of `words` in its command line."""
    for child in psutil.Process(worker.pid).children(recursive=True):
        try:
            if all(any(word in part for part in child.cmdline()) for word in words):
                return True
        except psutil.NoSuchProcess:
            pass
    return False


def phase_two_at_once(root: Path) -> dict:
    started = time.monotonic()
    runs = trigger(2)
    wait_finished(runs)
    return {"seconds": round(time.monotonic() - started, 1), "runs": [summary(r, root) for r in runs]}


def phase_machine_dies(root: Path, seed: Path, endpoint: str, workers: dict, watch: replicas.Watch) -> dict:
    origin, served_before, started = root / "origin.git", watch.versions(), time.monotonic()
    change_params_on_main(seed, "lr", 2e-4)
    before = (machines.s3_objects(endpoint), machines.git(origin, "for-each-ref"))
    [killed] = trigger()
    worker_name = machines.wait_for(
        lambda: next((n for n, w in workers.items() if descendants_running(w, "florence-ops", "train")), None),
        "a worker training", RUN_TIMEOUT_S, 0.5,
    )  # fmt: skip
    worker = workers.pop(worker_name)
    for member in [*psutil.Process(worker.pid).children(recursive=True), psutil.Process(worker.pid)]:
        member.send_signal(signal.SIGKILL)
    killed_at, killed_wall = time.monotonic(), time.time()
    [after] = trigger()
    holding = "holding the pool's retraining slot"
    machines.wait_for(lambda: any(holding in line for line in logs(after)), "the next run holding the slot", 300, 1)
    freed_s = round(time.monotonic() - killed_at, 1)
    unchanged = before == (machines.s3_objects(endpoint), machines.git(origin, "for-each-ref"))
    wait_finished([after])
    next_run = summary(after, root)
    machines.wait_for(lambda: state(killed).is_final(), "the killed run's end", 300, 2)  # heartbeats missed
    ended = state(killed)
    swap = None
    if next_run["decision"] == "promoted":  # the replicas follow the promotion
        assigned_at, tag = replicas.latest_prod(watch, started)
        watch.wait_moved(served_before, 120)
        swap = watch.swap(served_before, assigned_at, tag)
    killed_run = {"id": killed, "state": ended.type.value, "message": ended.message,
                  "ended_s_after_the_kill": round(ended.timestamp.timestamp() - killed_wall, 1)}  # fmt: skip
    return {"killed_worker": worker_name, "killed_run": killed_run, "next_run_held_the_slot_after_s": freed_s,
            "remotes_unchanged": unchanged, "next_run": next_run, "replicas_swap": swap}  # fmt: skip


def phase_s3_stops(root: Path, s3, workers: dict) -> dict:
    [run] = trigger()
    machines.wait_for(
        lambda: any(descendants_running(w, "dvc", "push") for w in workers.values()), "a dvc push", RUN_TIMEOUT_S, 0.1
    )
    machines.stop(s3, signal.SIGKILL)
    wait_finished([run])
    branches = machines.git(root / "origin.git", "for-each-ref", "--format=%(refname)")
    return {"run": summary(run, root), "branch_pushed": f"retrain/{run}" in branches}


def rehearse(root: Path, overrides: dict) -> dict:
    """Start the pool on `root`, run the three phases, and return what happened."""
    started = time.monotonic()
    # the registry on the git remote: a run's clone, and any tag kept only there, is deleted when the run ends
    params = apply_overrides(read_yaml(machines.REPO / "params.yaml"), {"registry.git_remote": "origin", **overrides})
    with machines.s3_server(root) as (endpoint, s3), machines.prefect_server(root) as api_url:
        os.environ.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(root / "prefect-control"))
        origin, seed = machines.git_remote(root, params, endpoint)
        machines.prefect_cli(seed, api_url, "work-pool", "create", machines.POOL, "--type", "process")
        machines.prefect_cli(seed, api_url, "--no-prompt", "deploy", "--name", "scheduled",
                             FLORENCE_OPS_GIT_URL=origin.as_uri())  # fmt: skip
        machines.prefect_cli(seed, api_url, "automation", "create", "--from-file", "flows/automations.yaml")
        workers = {name: machines.start_worker(root, name, api_url) for name in ("machine-1", "machine-2")}
        try:
            result = {"two_at_once": phase_two_at_once(root)}
            with replicas.replicas_serving(root, seed, origin, api_url) as watch:
                result["replicas"] = {"started_in_s": watch.ready_s, "serving": watch.versions()}
                result["machine_dies"] = phase_machine_dies(root, seed, endpoint, workers, watch)
                result["corrupt_in_s3"] = replicas.run_fault(watch, root, origin, endpoint)
                result["s3_stops"] = phase_s3_stops(root, s3, workers)
                result["replicas"].update(requests=watch.counts(0.0), failures=watch.failures()[:10])
            result["registry_tags"] = machines.git(origin, "tag", "--list").split()  # versions and stages promoted
        finally:
            for worker in workers.values():
                machines.stop(worker)
            for tmp in root.glob("*/tmp"):  # the machines' temporary directories (see `machines.machine_env`)
                shutil.rmtree(tmp.resolve(), ignore_errors=True)
    return {**result, "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override (repeat)")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument("--root", type=Path, help="where the machines live (default: a temporary directory)")
    args = parser.parse_args(argv)
    overrides = {key: parse_value(value) for key, _, value in (pair.partition("=") for pair in args.set)}
    root = args.root or Path(tempfile.mkdtemp(prefix="florence-ops-pool-"))
    root.mkdir(parents=True, exist_ok=True)
    result = rehearse(root, overrides)
    write_json(args.out, {"date": datetime.now(UTC).isoformat(), "overrides": overrides, "root": str(root), **result})
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Retrain Florence-2 on DocVQA by running the DVC pipeline, and promote the result when it beats the champion.

DVC owns the graph, Prefect owns the clock: this flow runs `dvc repro` (or `dvc exp run`) and never a stage itself.
Run it once now with `python flows/retrain.py [--force] [--set key=value ...]`; `flows/deploy.py` schedules it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from florence_ops import pool, promotion, registry
from florence_ops.artifacts import CHAMPION_FILE, METRICS_FILE
from florence_ops.config import PARAMS_FILE, Params, load_params, to_dict
from florence_ops.dvc_runs import run_dvc
from florence_ops.params_file import parse_value
from florence_ops.prefect_server import prefect_api
from florence_ops.run_history import RUNNING, record_crashed_runs, report_markdown, write_history

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = ".florence-ops.lock"  # held (flock) by the run that owns the pipeline; holds its pid and run id
PARAMS_BACKUP = ".florence-ops.params.yaml"  # params.yaml as committed, while a run with overrides is going
DOWNLOAD_RETRIES = 3  # a network download may fail transiently; nothing else is retried
DOWNLOAD_RETRY_DELAYS = [30, 120, 300]  # seconds
ARTIFACT_KEY = "florence-retrain"


class PipelineBusy(RuntimeError):
    """Another retraining run holds the pipeline lock."""


@contextmanager
def pipeline_lock(path: Path, run_id: str) -> Iterator[str | None]:
    """Hold the exclusive, non-blocking lock on `path` for this run; PipelineBusy names the holder otherwise.

    Yields the note a killed holder left behind ("pid N, run X"; a run that ends clears its note), or None.
    The lock guards one checkout; across machines the Prefect server's concurrency slot does (flows/pool.py).
    """
    lock = FileLock(path, timeout=0)  # the lock file stays after release: deleting it races with lockers
    try:
        lock.acquire()
    except Timeout:
        holder = _read_note(path) or "an unknown process"
        raise PipelineBusy(f"another retraining run holds the pipeline ({holder}); try again when it ends") from None
    try:
        left_by_killed_run = _read_note(path)
        path.write_text(f"pid {os.getpid()}, run {run_id}\n", encoding="utf-8")
        yield left_by_killed_run
    finally:
        path.write_text("", encoding="utf-8")
        lock.release()


def _read_note(path: Path) -> str | None:
    """The holder's note in the lock file, or None when it is empty."""
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """`["lr=1e-5", "data.hf.max_samples=100"]` as `{"lr": "1e-5", ...}`; ValueError for a pair without `=`."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {pair!r}")
        overrides[key.strip()] = value
    return overrides


def typed_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Override values with text parsed as YAML 1.2 (`1e-5` a float, `null` None, `[]` a list), as DVC reads it."""
    return {key: parse_value(value) if isinstance(value, str) else value for key, value in overrides.items()}


def dvc_args(overrides: dict[str, Any], target: str | None = None, pull: bool = False) -> list[str]:
    """`dvc repro [target]`, or `dvc exp run --set-param k=v ... [target]` when there are overrides; with `pull`,
    missing outputs and run-cache entries come from the DVC remote (`--pull`)."""
    pairs = (f"--set-param={k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items())
    command = ["exp", "run", *pairs] if overrides else ["repro"]
    return command + (["--pull"] if pull else []) + ([target] if target else [])


def download_uses_network(params: Params, repo: Path) -> bool:
    """Whether the download stage fetches from the hub: hub data, or a hub model (not `tiny`, not a local dir)."""
    model = params.model.name
    return params.data.source == "hf" or (model != "tiny" and not (repo / model).is_dir())


def git_state(repo: Path) -> dict[str, Any]:
    """`git rev-parse HEAD` of `repo` and whether tracked files differ from it (None, None outside git)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    revision = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if revision else None
    return {"revision": revision, "dirty": dirty}


@task(name="fingerprint data", cache_policy=NO_CACHE)
def fingerprint_data(params: Params, repo: Path) -> dict[str, Any]:
    """The input data's fingerprint (see `promotion.data_fingerprint`)."""
    return promotion.data_fingerprint(params, repo)


@task(name="read the registry's champion", cache_policy=NO_CACHE)
def registry_champion(repo: Path, params: Params) -> dict[str, Any] | None:
    """The champion record of the version holding the stage in the registry (`registry.champion_record`)."""
    return registry.champion_record(repo, params)


@task(name="gate and register", cache_policy=NO_CACHE)
def promote_in_registry(
    repo: Path, params: Params, metrics: dict[str, Any], record: dict[str, Any] | None = None
) -> registry.Promotion:
    """Compare with the version holding `registry.stage`; register and assign a winner (see `registry`)."""
    return registry.promote_if_better(repo, params, metrics, record)


@task(name="promote", cache_policy=NO_CACHE)
def promote_champion(export_dir: Path, champion_dir: Path, record: dict[str, Any], record_path: Path) -> None:
    """Atomically make the exported model the champion (see `promotion.promote`)."""
    promotion.promote(export_dir, champion_dir, record, record_path)


def run_pipeline(params: Params, overrides: dict[str, Any], repo: Path, remotes: bool = False) -> dict | None:
    """The DVC pipeline, its download stage first and with retries when that stage goes to the network; with
    `remotes`, stages restored from the DVC remote's run-cache where it can. Returns what it did per stage."""
    if download_uses_network(params, repo):
        download = run_dvc.with_options(
            name="dvc download", retries=DOWNLOAD_RETRIES, retry_delay_seconds=DOWNLOAD_RETRY_DELAYS
        )
        download(dvc_args(overrides, "download", remotes), repo)
    stages = run_dvc(dvc_args(overrides, pull=remotes), repo)
    if stages and not stages["ran"]:
        restored, unchanged = stages["restored"], stages["unchanged"]
        get_run_logger().info("no stage ran: restored from the run-cache %s, unchanged %s", restored, unchanged)
    return stages


@contextmanager
def params_restored(repo: Path) -> Iterator[None]:
    """Put params.yaml back as it was on exit: `dvc exp run --set-param` writes the overrides into it."""
    shutil.copy2(repo / PARAMS_FILE, repo / PARAMS_BACKUP)
    try:
        yield
    finally:
        os.replace(repo / PARAMS_BACKUP, repo / PARAMS_FILE)


def restore_interrupted_params(repo: Path) -> None:
    """Undo the overrides a killed run left in params.yaml (its backup outlived it)."""
    if (repo / PARAMS_BACKUP).exists():
        get_run_logger().warning("restoring params.yaml from %s, left by an interrupted run", PARAMS_BACKUP)
        os.replace(repo / PARAMS_BACKUP, repo / PARAMS_FILE)


def _train_and_judge(
    repo: Path, record: dict[str, Any], force: bool, overrides: dict[str, Any], remotes: bool = False
) -> None:
    """The locked part of a run: decide whether to train, run the pipeline, gate and promote. Fills `record`."""
    logger = get_run_logger()
    restore_interrupted_params(repo)
    params = load_params(repo / PARAMS_FILE, typed_overrides(overrides))
    record["params"] = to_dict(params)
    champion_dir = repo / params.promotion.champion_dir
    champion_path = repo / params.paths.reports / CHAMPION_FILE
    promotion.recover_champion(champion_dir)
    promotion.sync_champion_record(champion_dir, champion_path)
    record["champion"] = champion = promotion.read_champion(champion_path)
    champion_run_id = (champion or {}).get("run_id")
    for path in record_crashed_runs(repo / params.paths.reports / "history", record["run_id"], champion_run_id):
        logger.warning("a killed run left %s unfinished: rewritten as crashed", path)
    write_history(repo, {**record, "status": RUNNING, "decision": None})  # what a killed run leaves behind
    record["git"] = git_state(repo)
    record["data_fingerprint"] = fingerprint = fingerprint_data(params, repo)
    if registry.git_remote(repo, params.registry) is not None:  # the champion is what the registry holds, for
        record["champion"] = champion = registry_champion(repo, params)  # any machine: not this clone's copy
    skip = None if force else promotion.skip_reason(champion, fingerprint, params)
    if skip:
        record.update(decision="skipped", reason=skip)
        logger.info("skipping training: %s", skip)
        return
    with params_restored(repo) if overrides else nullcontext():
        record["stages"] = run_pipeline(params, overrides, repo, remotes)
        if remotes:  # before the gate: what a promotion names is on the remotes first
            pool.push_outputs(repo)
            record["branch"] = pool.commit_run(repo, record["run_id"])
    metrics = promotion.read_metrics(repo / params.paths.reports / METRICS_FILE, params.promotion.metric)
    record["metrics"] = metrics
    try:
        outcome = promote_in_registry(repo, params, metrics, champion_record(record))
    except registry.RegistryError:
        record["decision"] = "promotion_failed"
        raise
    verdict = outcome.verdict
    record["comparison"], record["registry"] = verdict.as_dict(), outcome.as_dict()
    logger.info(verdict.reason)
    record["reason"] = verdict.reason
    if verdict.promote:
        try:  # the local copy of what the registry now holds
            promote_champion(repo / params.paths.export, champion_dir, champion_record(record), champion_path)
        except promotion.PromotionError:
            record["decision"] = "promotion_failed"  # the gate passed: `comparison` and `reason` say so
            raise
    record["decision"] = "promoted" if verdict.promote else "rejected"


def champion_record(record: dict[str, Any]) -> dict[str, Any]:
    """What the champion keeps of the run that trained it (in `models/champion` and in the registry's version)."""
    keys = ("run_id", "git", "params", "overrides", "data_fingerprint", "metrics", "registry")
    return {**{key: record[key] for key in keys}, "promoted_at": datetime.now(UTC).isoformat()}


def _publish(repo: Path, record: dict[str, Any]) -> None:
    """Write the history file and the markdown artifact; an artifact failure is logged, not raised."""
    logger = get_run_logger()
    record["finished_at"] = datetime.now(UTC).isoformat()
    logger.info("history: %s", write_history(repo, record))
    try:
        create_markdown_artifact(markdown=report_markdown(record), key=ARTIFACT_KEY, description="retraining report")
    except Exception as error:  # the history file is the record; the artifact is only a view of it
        logger.warning("could not create the markdown artifact: %s", error)


@flow(name="florence-retrain")
def retrain(
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    repo_dir: str | None = None,
    remotes: bool = False,
    slot_lease_s: float = pool.SLOT_LEASE_S,
) -> dict:
    """Retrain on the current data, compare with the champion (none yet: the base model) on `promotion.metric`,
    promote only a winner.

    Skipping: unless `force`, nothing is trained when the data fingerprint and the params equal the champion's.
    Code is not fingerprinted: force a run after a code change (DVC then reruns only the stages it touches).

    Overrides: `overrides` ({"lr": "1e-5"} or {"lr": 1e-5}; text as `dvc exp run --set-param` reads it) make the
    run a DVC experiment, `dvc exp run --set-param ...`, and apply to this run only. DVC writes them into
    params.yaml; the flow puts params.yaml back afterwards, also when the run fails (or, if the process was killed,
    at the start of the next run), so the next scheduled run trains on the committed params. The workspace outputs
    and dvc.lock stay those of the overridden run; DVC sees the difference and retrains on the next run.

    Every run writes `reports/history/<UTC time>-<run id>.json` (status "running" once it holds the pipeline lock,
    its outcome at the end; the next run marks a killed run's entry "crashed") and a markdown artifact. `repo_dir`
    defaults to the repository holding this file. Returns the history record; raises when the run failed.

    Remotes (the work-pool deployment, from a clean clone): `remotes` holds the Prefect server's one retraining
    slot (lease `slot_lease_s`) for the run, restores stages from the DVC remote's run-cache, pushes the outputs and
    commits the run to `retrain/<run id>` of the git remote before the gate (see `florence_ops.pool`).
    """
    repo = Path(repo_dir).resolve() if repo_dir else PROJECT_ROOT
    overrides = dict(overrides or {})
    record: dict[str, Any] = {
        "run_id": str(flow_run.get_id() or uuid.uuid4()),
        "started_at": datetime.now(UTC).isoformat(),
        "finished_at": None,
        "status": "failed",
        "error": None,
        "decision": "rejected",  # a run that fails before the gate promotes nothing
        "reason": None,
        "forced": force,
        "overrides": overrides,
        **dict.fromkeys(
            ("git", "params", "data_fingerprint", "champion", "metrics", "comparison", "registry", "stages")
        ),
    }
    try:
        if remotes:
            pool.require_shared_registry(load_params(repo / PARAMS_FILE, typed_overrides(overrides)))
        slot = pool.pool_slot(record, slot_lease_s) if remotes else nullcontext()
        with slot, pipeline_lock(repo / LOCK_FILE, record["run_id"]) as left_by_killed_run:
            if left_by_killed_run:
                get_run_logger().warning("the previous holder of the pipeline (%s) was killed", left_by_killed_run)
            _train_and_judge(repo, record, force, overrides, remotes)
        record["status"] = "completed"
        return record
    except BaseException as error:
        record["error"] = " ".join(f"{type(error).__name__}: {error}".split())
        record["reason"] = record["reason"] or "the run failed"
        raise
    finally:
        _publish(repo, record)


def main(argv: list[str] | None = None) -> int:
    """Run the flow once now; exit 1 with a one-line message when it fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="train even if data and params are unchanged")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param (repeat)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as error:
        parser.error(str(error))
    try:
        with prefect_api():  # without PREFECT_API_URL, a temporary server that dies with this process
            record = retrain(force=args.force, overrides=overrides)
    except Exception as error:  # any failure becomes one line and an exit code
        print(f"retrain failed: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(json.dumps({key: record[key] for key in ("run_id", "decision", "reason")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a retraining run on a Prefect work pool adds to a run in one checkout: the pool's one slot, and the remotes.

Every run starts from a clean clone (prefect.yaml's pull steps) and keeps nothing on its machine, so it
- holds the Prefect server's global concurrency limit `SLOT_NAME` (one slot) under a lease its process renews: runs
  on any worker go one at a time, and a machine that dies mid-run frees the slot when its lease expires;
- runs the pipeline with `--pull`: DVC restores a stage whose inputs it has seen before from the run-cache on the DVC
  remote instead of running it again;
- pushes its outputs and run-cache to the DVC remote (`push_outputs`) and commits dvc.lock, params and metrics to a
  branch `retrain/<run id>` of the git remote (`commit_run`), before anything is promoted.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import chdir, contextmanager, suppress
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from florence_ops.config import Params
from florence_ops.dvc_runs import PipelineFailed, run_dvc
from florence_ops.errors import UserError

SLOT_NAME = "florence-ops-retrain"  # the global concurrency limit every pool run takes its slot from
SLOT_LEASE_S = 60.0  # renewed every 45 s by the run's process; a dead machine's slot frees within this (+ 15 s)
BRANCH_PREFIX = "retrain/"
GIT_IDENTITY = ("-c", "user.name=florence-ops", "-c", "user.email=florence-ops@localhost")  # when none is set


def require_shared_registry(params: Params) -> None:
    """UserError unless the registry is on a git remote: a pool run's clone, with any tag kept only there, is deleted
    when the run ends."""
    if not params.registry.git_remote.strip():
        raise UserError("a run on a work pool needs registry.git_remote (e.g. origin) in params.yaml: the tags of a "
                        "promotion written only to its clone are lost when the run ends")  # fmt: skip


def _ensure_slot_limit() -> None:
    """Create the one-slot limit `SLOT_NAME` on the Prefect server unless it exists (a limit set by hand stays)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(SLOT_NAME)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another run created it meanwhile
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=SLOT_NAME, limit=1))


@contextmanager
def pool_slot(record: dict[str, Any], lease_s: float = SLOT_LEASE_S) -> Iterator[None]:
    """Wait for the pool's retraining slot and hold it within the block; records the wait in `slot_wait_s`.

    The lease is renewed while this process lives; when renewal fails the run is stopped, since the slot may have
    gone to another run.
    """
    logger = get_run_logger()
    _ensure_slot_limit()
    logger.info("waiting for the pool's retraining slot (%s)", SLOT_NAME)
    started = time.monotonic()
    with concurrency(SLOT_NAME, occupy=1, lease_duration=lease_s, strict=True):
        record["slot_wait_s"] = round(time.monotonic() - started, 1)
        logger.info("holding the pool's retraining slot after waiting %.1f s", record["slot_wait_s"])
        yield


def default_remote(repo: Path) -> str:
    """The DVC remote `dvc push` uses in `repo`: its name and URL (and endpoint, for S3-compatible storage)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        name = dvc_repo.config["core"].get("remote")
        settings = dvc_repo.config["remote"].get(name or "", {})
    endpoint = f" at {settings['endpointurl']}" if settings.get("endpointurl") else ""
    return f"'{name}' ({settings.get('url', 'no url')}{endpoint})" if name else "(no default remote)"


def _push_run_cache_outputs(repo: Path) -> None:
    """Push the objects of this clone's run-cache entries that `dvc push --run-cache` leaves out.

    DVC commits the `cache: false` outputs of a stage (metrics, plots) into the cache for its run-cache entry, but
    pushes only the entry: another machine then finds the entry and runs the stage anyway. Pushing these objects
    lets `dvc repro --pull` restore the stage there.
    """
    from dvc.repo import Repo

    with chdir(repo), Repo(".") as dvc_repo:  # DVC resolves the run-cache's stage paths against the working directory
        entries = [(p.parent.name, p.name) for p in (Path(dvc_repo.cache.legacy.path) / "runs").glob("*/*/*")]
        local = dvc_repo.cache.local
        for objects in dvc_repo.stage_cache.get_used_objs(entries).values():
            present = {obj for obj in objects if local.exists(obj.value)}  # entries pulled without their outputs
            failed = dvc_repo.cloud.push(present).failed
            if failed:
                raise RuntimeError(f"{len(failed)} run-cache objects were not pushed")


@task(name="push outputs", cache_policy=NO_CACHE)
def push_outputs(repo: Path) -> None:
    """`dvc push --run-cache` and the run-cache's own outputs; PipelineFailed naming the remote when it fails."""
    try:
        run_dvc.fn(["push", "--run-cache"], repo)
        _push_run_cache_outputs(repo)
    except Exception as error:
        detail = " ".join(str(error).split())
        raise PipelineFailed(f"could not push to the DVC remote {default_remote(repo)}: {detail}") from None


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if done.returncode:
        raise PipelineFailed(f"`git {' '.join(args)}` exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


@task(name="commit run", cache_policy=NO_CACHE)
def commit_run(repo: Path, run_id: str, remote: str = "origin") -> str:
    """Commit what the run changed in git (dvc.lock, params.yaml, metrics, plots, its history entry) to the branch
    `retrain/<run_id>` and push that branch to `remote`; returns the branch."""
    branch = f"{BRANCH_PREFIX}{run_id}"
    identity = () if _git_identity_set(repo) else GIT_IDENTITY
    _git(repo, "checkout", "-q", "-B", branch)
    _git(repo, "add", "-A")
    _git(repo, *identity, "commit", "-q", "--allow-empty", "-m", f"retrain {run_id}: dvc.lock, params and metrics")
    _git(repo, "push", "-q", remote, f"HEAD:refs/heads/{branch}")
    get_run_logger().info("committed the run to %s of %s", branch, _git(repo, "remote", "get-url", remote))
    return branch


def _git_identity_set(repo: Path) -> bool:
    if os.environ.get("GIT_AUTHOR_NAME") and os.environ.get("GIT_COMMITTER_NAME"):
        return True
    done = subprocess.run(["git", "config", "user.email"], cwd=repo, capture_output=True, text=True)
    return bool(done.stdout.strip())

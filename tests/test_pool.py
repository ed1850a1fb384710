"""A DVC remote on S3 (moto's server) as pool runs use it: what one clone pushes, a clean clone elsewhere restores
from the run-cache, `cache: false` outputs (metrics) included, without running a stage again. The slow test rehearses
the pool on one host (benchmarks/pool_rehearsal.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.pool_machines import BUCKET, git
from florence_ops import pool
from florence_ops.errors import UserError
from florence_ops.params_file import read_yaml
from tests.conftest import REPO, TINY_OVERRIDES, tiny_params
from tests.remotes import s3_endpoint  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

PIPELINE = """\
stages:
  features:
    cmd: cat data.txt data.txt > features.txt
    deps: [data.txt]
    outs: [features.txt]
  train:
    cmd: cat features.txt data.txt > model.bin && echo '{"anls":0.5}' > metrics.json
    deps: [features.txt]
    outs: [model.bin]
    metrics:
      - metrics.json:
          cache: false
"""


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(cwd.parent / f"{cwd.name}-dvc-site")}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def origin(tmp_path: Path, s3_endpoint: str) -> Path:  # noqa: F811 (fixture)
    """A bare git remote whose main branch holds a two-stage DVC pipeline with its remote on the S3 server."""
    origin, seed = tmp_path / "origin.git", tmp_path / "seed"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    seed.mkdir()
    git(seed, "init", "-q", "-b", "main")
    dvc(seed, "init", "-q")
    dvc(seed, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
    dvc(seed, "remote", "modify", "storage", "endpointurl", s3_endpoint)
    (seed / "dvc.yaml").write_text(PIPELINE)
    (seed / "data.txt").write_text("pages\n")
    git(seed, "add", "-A")
    git(seed, "commit", "-q", "-m", "pipeline")
    git(seed, "push", "-q", origin.as_uri(), "main")
    return origin


def test_a_clean_clone_restores_every_stage_from_the_pushed_run_cache(origin, tmp_path):
    first, second = tmp_path / "machine-1", tmp_path / "machine-2"
    git(tmp_path, "clone", "-q", origin.as_uri(), str(first))
    assert "Running stage 'train'" in dvc(first, "repro", "--pull")
    dvc(first, "push", "--run-cache")
    pool._push_run_cache_outputs(first)

    git(tmp_path, "clone", "-q", origin.as_uri(), str(second))  # main: no dvc.lock, no outputs, no cache
    output = dvc(second, "repro", "--pull")
    assert "Running stage" not in output, output
    assert "Stage 'features' is cached" in output and "Stage 'train' is cached" in output
    for name in ("features.txt", "model.bin", "metrics.json"):
        assert (second / name).read_bytes() == (first / name).read_bytes(), name


def test_the_remote_is_named_with_its_endpoint(origin, tmp_path, s3_endpoint):  # noqa: F811 (fixture)
    git(tmp_path, "clone", "-q", origin.as_uri(), str(tmp_path / "clone"))
    assert pool.default_remote(tmp_path / "clone") == f"'storage' (s3://{BUCKET}/dvc at {s3_endpoint})"


def test_a_pool_run_needs_the_registry_on_the_git_remote(tmp_path):
    with pytest.raises(UserError, match=r"needs registry.git_remote \(e.g. origin\)"):
        pool.require_shared_registry(tiny_params(tmp_path))  # "": tags in the clone only
    pool.require_shared_registry(tiny_params(tmp_path, **{"registry.git_remote": "origin"}))


@pytest.mark.slow
@pytest.mark.rehearsal
def test_pool_rehearsal_one_run_at_a_time_a_dead_machine_replicas_following_prod_and_a_stopped_s3(tmp_path):
    """benchmarks/pool_rehearsal.py as its users run it, on the tiny params: see its docstring for the phases."""
    # a negative margin admits the tiny model, which learns nothing in two epochs: phases 1 and 2 need a promotion
    tiny = {**TINY_OVERRIDES, "promotion.margin": -1.0}
    overrides = [f"--set={key}={value}" for key, value in tiny.items()]
    command = [sys.executable, str(REPO / "benchmarks/pool_rehearsal.py"), "--root", str(tmp_path / "pool")]
    done = subprocess.run([*command, "--out", str(tmp_path / "pool.json"), *overrides], capture_output=True,
                          text=True, timeout=1500)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "pool.json").read_text())
    origin = tmp_path / "pool/origin.git"

    trained, waited = sorted(result["two_at_once"]["runs"], key=lambda run: run["slot_wait_s"])
    assert trained["worker"] != waited["worker"] and {trained["state"], waited["state"]} == {"COMPLETED"}
    assert "train" in trained["stages_ran"] and trained["decision"] == "promoted"
    # the second run, on a clean clone with no champion of its own, compares with the version holding prod
    assert waited["slot_wait_s"] > 10 and waited["decision"] == "skipped" and not waited["stages_ran"]
    assert f"params unchanged since champion run {trained['run_id']}" in waited["reason"]
    assert waited["branch"] is None
    # the run's dvc.lock and metrics on its branch of the git remote
    assert trained["branch"] == f"retrain/{trained['run_id']}"
    assert "anls" in json.loads(git(origin, "show", f"{trained['branch']}:reports/metrics.json"))
    assert "train:" in git(origin, "show", f"{trained['branch']}:dvc.lock")

    died = result["machine_dies"]
    assert died["remotes_unchanged"] and died["next_run"]["worker"] != died["killed_worker"]
    assert died["next_run"]["state"] == "COMPLETED" and "train" in died["next_run"]["stages_ran"]
    assert 5 < died["next_run"]["slot_wait_s"] <= pool.SLOT_LEASE_S + 30  # the killed run's lease ran out
    # the killed run cannot report its end: the automation marks it Crashed `within` s after its last heartbeat (one
    # every `beat` s, so up to `beat` s before the kill), not Running for ever
    [automation] = read_yaml(REPO / "flows/automations.yaml")["automations"]
    within = automation["trigger"]["within"]
    beat = int(read_yaml(REPO / "prefect.yaml")["deployments"][0]["work_pool"]["job_variables"]["env"]
               ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])  # fmt: skip
    assert died["killed_run"]["state"] == "CRASHED", died["killed_run"]
    assert died["killed_run"]["message"] == automation["actions"][0]["message"]
    assert within - beat <= died["killed_run"]["ended_s_after_the_kill"] <= within + 60, died["killed_run"]

    # two replicas following prod swapped to the promoted version within their poll interval, no request failed
    swap = died["replicas_swap"]
    new = f"v0.0.{len([tag for tag in result['registry_tags'] if '@v' in tag]) - 1}"  # before the corrupt one
    assert set(swap["before"].values()) == {"v0.0.1"} and set(swap["after"].values()) == {new} != {"v0.0.1"}
    assert all(0 < seconds <= swap["poll_interval_s"] + 60 for seconds in swap["switch_s"].values())
    assert swap["requests_during_swap"]["sent"] > 0 and swap["requests_during_swap"]["failed"] == 0
    corrupt = result["corrupt_in_s3"]  # prod assigned to a version whose weights are corrupt in the bucket
    assert corrupt["before"] == corrupt["after"] == {"replica-1": new, "replica-2": new}
    for failed in corrupt["last_failed_fetch"].values():
        assert failed["version"] == corrupt["corrupt_version"] and "does not match the hash" in failed["error"]
    served = result["replicas"]
    assert served["requests"]["sent"] > 20 and served["requests"]["failed"] == 0, served["failures"]

    stopped = result["s3_stops"]
    assert stopped["run"]["state"] == "FAILED" and not stopped["branch_pushed"]
    assert stopped["run"]["decision"] != "promoted" and "train" in stopped["run"]["stages_restored"]
    message = stopped["run"]["message"]
    assert "could not push to the DVC remote 'storage' (s3://florence-ops/dvc at http://127.0.0.1:" in message
    assert "\n" not in message.strip()

    # every promoted run registered a version in the registry on the git remote, and only those
    promoted = [run for run in (trained, waited, died["next_run"], stopped["run"]) if run["decision"] == "promoted"]
    versions = [tag for tag in result["registry_tags"] if "@v" in tag]  # and the corrupt one
    assert len(versions) == len(promoted) + 1 >= 2 and any("#prod#" in tag for tag in result["registry_tags"])

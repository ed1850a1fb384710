"""Serving replicas that follow the registry (`--model registry:florence-docvqa#prod`), on a machine that has no
clone: only params.yaml naming the git remote. A newly assigned version is fetched and swapped in while clients keep
asking, with no failed request; a version whose bytes are corrupt in the DVC remote leaves the replica where it was."""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import time
import types
from pathlib import Path

import gto.api
import pytest
from openai import OpenAI

from florence_ops import registry
from florence_ops.config import Params, load_params
from florence_ops.serving import replica as replica_module
from florence_ops.serving.health import registry_status
from florence_ops.serving.replica import Replica
from tests.conftest import DvcRemote, record_model
from tests.serving.conftest import (
    METRICS,
    LoopingClients,
    Server,
    ask,
    free_port,
    pages_answered_differently,
    raw_pages,
    write_params,
)

POLL_S = 1.0
LOAD_BUDGET_S = 60  # fetching and loading the tiny model beside the current one, on a busy 2-core machine


def promote(repo: Path, model_dir: Path, anls: float) -> registry.ModelVersion:
    """What the retraining flow does with a winner: the registry's gate on the workspace's model."""
    metrics = record_model(repo, model_dir, {**METRICS, "anls": anls, "before": {"anls": 0.0}})
    outcome = registry.promote_if_better(repo, load_params(repo / "params.yaml"), metrics)
    assert outcome.verdict.promote
    return outcome.registered


def replica_server(tmp_path: Path, git_remote: str) -> Server:
    """`florence-ops serve --model registry:florence-docvqa#prod` in a folder that is not a clone."""
    return Server("registry:florence-docvqa#prod", replica_params(tmp_path, git_remote), free_port())


def in_process_replica(tmp_path: Path, git_remote: str, **overrides) -> Replica:
    """The replica `florence-ops serve --model registry:florence-docvqa#prod` runs, here polled by hand."""
    host_params = replica_params(tmp_path, git_remote, **overrides)
    return Replica.for_reference("registry:florence-docvqa#prod", load_params(host_params), repo=host_params.parent)


def replica_params(tmp_path: Path, git_remote: str, **overrides) -> Path:
    """params.yaml of a replica's host folder (not a clone): the git remote, the poll interval, the replica folder."""
    host = tmp_path / "replica-host"
    host.mkdir()
    defaults = {"serve.reload_interval_s": 0.5, "registry.git_remote": git_remote, "registry.poll_interval_s": POLL_S,
                "registry.replica_dir": str(host / "models/replica")}  # fmt: skip
    return write_params(host, **{**defaults, **overrides})


def pushed_model_commit(repo: Path, model_dir: Path, message: str) -> tuple[Params, str]:
    """What the retraining gate does before registering: `model_dir` as the clone's model, committed beside HEAD, its
    bytes pushed to the DVC remote; the clone's params and the commit."""
    params = load_params(repo / "params.yaml")
    record_model(repo, model_dir, {**METRICS, "anls": 0.6, "before": {"anls": 0.0}})
    commit = registry.model_commit(repo, params, message)
    registry.push_model(repo, params)
    return params, commit


def register_corrupt(repo: Path, model_dir: Path, dvc_remote: DvcRemote) -> Params:
    """Register `model_dir` as the next version, holding the stage, with its weights corrupt in `dvc_remote` (pushed
    whole, then half of them written over the stored object); the clone's params."""
    params, commit = pushed_model_commit(repo, model_dir, "a model whose weights get corrupt in the remote")
    weights = (model_dir / "model.safetensors").read_bytes()
    dvc_remote.overwrite(weights, weights[: len(weights) // 2])
    registry.register(repo, params, commit)
    return params


def registry_health(server: Server) -> dict:
    return server.healthz()["registry"]


def test_a_replica_swaps_to_a_newly_assigned_version_without_failed_requests(served, registry_repo, git_remote,
                                                                             tmp_path):  # fmt: skip
    old, new, pages = pages_answered_differently(served)
    promote(registry_repo, served / "models/export", 0.3)
    server = replica_server(tmp_path, git_remote)
    try:
        first = server.healthz()
        assert first["registry"]["version"] == "v0.0.1" and first["registry"]["metrics"]["anls"] == 0.3
        with LoopingClients(server.url, pages) as clients:
            clients.wait_for_replies(6)
            assigned_at = time.monotonic()
            promote(registry_repo, served / "models/other", 0.6)
            while time.monotonic() - assigned_at < POLL_S + LOAD_BUDGET_S and not clients.failures:
                if registry_health(server)["version"] == "v0.0.2":
                    break
                time.sleep(0.2)
            swapped_after = time.monotonic() - assigned_at
            old_version = first["version"]
            while not clients.failures and len({q for q, _, v in clients.replies if v != old_version}) < len(pages):
                time.sleep(0.2)
        health = server.healthz()
    finally:
        server.stop()
    failures, replies = clients.failures, clients.replies
    print(f"v0.0.2 assigned -> served after {swapped_after:.1f} s (poll {POLL_S} s); {len(replies)} replies")
    assert failures == []
    assert swapped_after < POLL_S + LOAD_BUDGET_S
    versions = [version for _, _, version in replies]
    assert versions[0] == first["version"] and set(versions) == {first["version"], health["version"]}
    for question, answer, version in replies:
        assert answer == (old if version == first["version"] else new)[question]
    served_entry = health["registry"]
    assert (served_entry["artifact"], served_entry["version"], served_entry["stage"]) == ("florence-docvqa", "v0.0.2",
                                                                                          "prod")  # fmt: skip
    assert served_entry["metrics"]["anls"] == 0.6 and served_entry["last_failed_fetch"] is None


@pytest.mark.parametrize("dvc_remote", ["local", "s3"], indirect=True)
def test_a_version_corrupt_in_the_dvc_remote_leaves_the_replica_on_its_version(served, registry_repo, git_remote,
                                                                              dvc_remote, tmp_path):  # fmt: skip
    promote(registry_repo, served / "models/export", 0.3)
    server = replica_server(tmp_path, git_remote)
    try:
        before = server.healthz()
        register_corrupt(registry_repo, served / "models/other", dvc_remote)
        deadline = time.monotonic() + POLL_S * 3 + LOAD_BUDGET_S
        while time.monotonic() < deadline and not registry_health(server)["last_failed_fetch"]:
            time.sleep(0.2)
        time.sleep(POLL_S * 2)  # a further poll changes nothing
        health = server.healthz()
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        page = raw_pages(served, "validation")[0]
        reply = ask(client, page["question"], page["image"]["bytes"])
    finally:
        server.stop()
    failed, log = health["registry"]["last_failed_fetch"], server.log.read_text()
    assert failed, f"no failed fetch in /healthz: {health['registry']}\n{log[-4000:]}"
    assert failed["version"] == "v0.0.2" and "does not match the hash DVC recorded" in failed["error"]
    assert health["registry"]["version"] == "v0.0.1" and health["registry"]["following"] == "v0.0.1"
    assert health["version"] == before["version"] == reply.system_fingerprint and health["status"] == "ok"
    assert "registry: v0.0.2 not fetched" in log  # one line per attempt


def test_a_look_at_the_registry_that_fails_is_made_again_at_the_next_poll(served, registry_repo, git_remote, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """The registry lists its tags but cannot be cloned for a moment (a git server restarting, a full disk): the
    next poll, with the tags unchanged since, still switches to the version newly assigned."""
    promote(registry_repo, served / "models/export", 0.3)
    replica = in_process_replica(tmp_path, git_remote)
    link = replica.start()
    promote(registry_repo, served / "models/other", 0.6)
    git, refused = registry._git, []

    def clone_refused_once(cwd, *args, **kwargs):
        if args[0] == "clone" and not refused:
            refused.append(args)
            raise registry.RegistryError("git clone failed: fatal: the remote end hung up unexpectedly")
        return git(cwd, *args, **kwargs)

    monkeypatch.setattr(registry, "_git", clone_refused_once)
    with pytest.raises(registry.RegistryError, match="hung up"):
        replica.check()
    assert refused and replica.current.version == "v0.0.1"
    replica.check()
    assert replica.current.version == "v0.0.2"
    weights = (link / "model.safetensors").read_bytes()
    assert weights == (served / "models/other/model.safetensors").read_bytes()


def test_an_assignment_seen_before_its_registration_is_not_fetched_as_a_version(served, registry_repo, git_remote,
                                                                               tmp_path):  # fmt: skip
    """A push updates its refs one by one: a replica may list the new assignment tag before the registration tag.
    It keeps serving the version it has until the version is registered, then switches to it by its name."""
    promote(registry_repo, served / "models/export", 0.3)
    replica = in_process_replica(tmp_path, git_remote)
    link = replica.start()
    repo_params, commit = pushed_model_commit(
        registry_repo, served / "models/other", "a model registered in two pushes"
    )
    registration = gto.api.register(registry_repo, "florence-docvqa", ref=commit, push=False)
    assignment = registry._assign(registry_repo, repo_params, registration.version)  # as `register` assigns
    for tag in (assignment, registration.tag):
        subprocess.run(["git", "push", "--quiet", git_remote, f"refs/tags/{tag}"], cwd=registry_repo, check=True)
        replica.check()
        assert replica.current.version == ("v0.0.2" if tag == registration.tag else "v0.0.1")
        assert sorted(p.name for p in replica.versions.iterdir()) == sorted({"v0.0.1", replica.current.version})
        with registry.registry_view(git_remote) as view:  # what `florence-ops registry show` lists from there
            listed = [v.version for v in registry.versions(view, repo_params)]
            holder = registry.resolve(view, repo_params)  # what the retraining gate compares with
        assert listed == (["v0.0.2", "v0.0.1"] if tag == registration.tag else ["v0.0.1"])
        assert holder.version == replica.current.version
    weights = (link / "model.safetensors").read_bytes()
    assert weights == (served / "models/other/model.safetensors").read_bytes()


def test_a_failed_fetch_is_forgotten_once_its_version_holds_the_stage_no_more(served, registry_repo, git_remote,
                                                                             dvc_remote, tmp_path):  # fmt: skip
    """v0.0.2 is corrupt in the DVC remote and `prod` is rolled back to v0.0.1: the replica stops retrying v0.0.2
    and `/healthz` no longer reports its failed fetch."""
    promote(registry_repo, served / "models/export", 0.3)
    replica = in_process_replica(tmp_path, git_remote)
    replica.start()
    replica.report_to(tmp_path / "status")
    params = register_corrupt(registry_repo, served / "models/other", dvc_remote)
    replica.poll()
    health = registry_status(tmp_path / "status", {})
    assert health["last_failed_fetch"]["version"] == "v0.0.2" and health["following"] == "v0.0.1"
    registry.rollback(registry_repo, params, "v0.0.1")
    replica.poll()
    health = registry_status(tmp_path / "status", {})
    assert health["last_failed_fetch"] is None and health["following"] == "v0.0.1"


def test_a_link_that_could_not_be_switched_is_switched_at_the_next_poll(served, registry_repo, git_remote, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """Switching `current` fails once (the disk full for a moment): the replica stays on its version, says so in
    `/healthz`, and switches at its next look, with the tags unchanged since."""
    promote(registry_repo, served / "models/export", 0.3)
    replica = in_process_replica(tmp_path, git_remote)
    link = replica.start()
    promote(registry_repo, served / "models/other", 0.6)
    switch, refused = replica_module.switch_link, []

    def full_once(link: Path, target: Path) -> None:
        if not refused:
            refused.append(target)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(link))
        switch(link, target)

    monkeypatch.setattr(replica_module, "switch_link", full_once)
    replica.report_to(tmp_path / "status")
    replica.poll()
    health = registry_status(tmp_path / "status", {})
    assert "No space left" in health["last_failed_check"]["error"] and health["following"] == "v0.0.1"
    assert (link / "model.safetensors").read_bytes() == (served / "models/export/model.safetensors").read_bytes()
    replica.last_failed_check["retry_at"] = 0  # the backoff's wait over (2x the interval)
    replica.poll()
    health = registry_status(tmp_path / "status", {})
    assert health["last_failed_check"] is None and health["following"] == "v0.0.2"
    assert (link / "model.safetensors").read_bytes() == (served / "models/other/model.safetensors").read_bytes()


def test_an_unreadable_registry_shows_in_healthz_and_is_cloned_less_and_less_often(served, registry_repo, git_remote,
                                                                                   tmp_path, monkeypatch):  # fmt: skip
    """A tag GTO refuses (a second version on a registered commit, pushed by hand) makes the registry unreadable:
    `/healthz` says so (`registry.last_failed_check`), and while the tags stay so the registry is cloned again only
    after 2x, 4x ... the interval, though its tags are listed at every poll; the poll after the tag is gone follows
    the version assigned meanwhile."""
    first = promote(registry_repo, served / "models/export", 0.3)
    replica = in_process_replica(tmp_path, git_remote, **{"registry.poll_interval_s": 10.0})
    replica.start()
    replica.report_to(tmp_path / "status")
    clock, git, clones = [time.time()], registry._git, []

    def counted(cwd, *args, **kwargs):
        clones.extend(args[:1] if args[0] == "clone" else [])
        return git(cwd, *args, **kwargs)

    monkeypatch.setattr(replica_module, "time", types.SimpleNamespace(time=lambda: clock[0], sleep=time.sleep))
    monkeypatch.setattr(registry, "_git", counted)
    run = functools.partial(subprocess.run, cwd=registry_repo, check=True, capture_output=True)
    run(["git", "tag", "-a", "florence-docvqa@v0.0.9-rc", "-m", "by hand", first.commit])
    run(["git", "push", "--quiet", git_remote, "refs/tags/florence-docvqa@v0.0.9-rc"])
    seen = []
    for advance_s in [0, 10, 10, 10, 20, 10, 30]:  # polls at 0, 10, 20, 30, 50, 60, 90 s
        clock[0] += advance_s
        replica.poll()
        failed = registry_status(tmp_path / "status", {})["last_failed_check"]
        assert "Multiple versions" in failed["error"] and replica.current.version == "v0.0.1"
        seen.append((len(clones), failed["attempts"]))
    # looks at 0, 20 (2x10 s after), 60 (4x10 s after) s; not at 10, 30, 50 or 90 (before 60 + 8x10 s)
    assert seen == [(1, 1), (1, 1), (2, 2), (2, 2), (2, 2), (3, 3), (3, 3)]
    run(["git", "push", "--quiet", "--delete", git_remote, "refs/tags/florence-docvqa@v0.0.9-rc"])
    run(["git", "tag", "--delete", "florence-docvqa@v0.0.9-rc"])
    promote(registry_repo, served / "models/other", 0.6)  # the gate reads the registry too
    before = len(clones)
    replica.poll()  # at 90 s still: tags that changed are looked at at once
    assert len(clones) == before + 1 and registry_status(tmp_path / "status", {})["last_failed_check"] is None
    assert replica.current.version == "v0.0.2"

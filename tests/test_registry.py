"""The model registry against a real git remote (a bare repository by URL) and a DVC remote: the gate registers and
assigns with GTO, any clone resolves and fetches what holds the stage, and a rollback is a new assignment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from florence_ops import promotion, registry
from florence_ops.cli import main
from florence_ops.config import load_params, to_dict
from florence_ops.params_file import read_yaml
from tests.conftest import REPO, record_model


def params_of(repo: Path, **overrides):
    return load_params(repo / "params.yaml", overrides)


def remote_tags(git_remote: str) -> list[str]:
    listing = subprocess.run(["git", "ls-remote", "--tags", git_remote], capture_output=True, text=True, check=True)
    names = (line.split("refs/tags/")[1] for line in listing.stdout.splitlines())
    return sorted(name for name in names if not name.endswith("^{}"))


def holder(git_remote: str, params) -> registry.ModelVersion | None:
    """What holds the stage, as a machine without the clone sees it: from the git remote alone."""
    with registry.registry_view(git_remote) as view:
        return registry.resolve(view, params)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_dvc_yaml_declares_the_registry_artifact():
    artifacts = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    params = read_yaml(REPO / "params.yaml")
    assert list(artifacts) == [params["registry"]["artifact"]]
    entry = artifacts[params["registry"]["artifact"]]
    assert entry["path"] == "${paths.export}" and entry["type"] == "model" and entry["desc"] and entry["labels"]


def test_a_first_champion_must_beat_the_base_model(registry_repo, git_remote):
    params = params_of(registry_repo)
    head = git(registry_repo, "rev-parse", "HEAD")
    metrics = record_model(registry_repo, b"learnt nothing", {"anls": 0.2, "before": {"anls": 0.25}})
    outcome = registry.promote_if_better(registry_repo, params, metrics)
    assert not outcome.verdict.promote and outcome.verdict.against == "base model"
    assert outcome.registered is None and remote_tags(git_remote) == []

    metrics = record_model(registry_repo, b"first", {"anls": 0.3, "before": {"anls": 0.25}})
    outcome = registry.promote_if_better(registry_repo, params, metrics)
    assert outcome.verdict.promote and outcome.champion is None
    assert remote_tags(git_remote) == ["florence-docvqa#prod#1", "florence-docvqa@v0.0.1"]
    seen = holder(git_remote, params)
    assert (seen.version, seen.stages, seen.tag) == ("v0.0.1", ("prod",), "florence-docvqa#prod#1")
    assert seen.metrics["anls"] == 0.3 and seen == outcome.registered
    # the version is a commit of the workspace's model on top of HEAD; the branch and the files stay as they were
    assert git(registry_repo, "rev-parse", "HEAD", f"{seen.commit}^").split() == [head, head]
    assert "dvc.lock" in git(registry_repo, "status", "--porcelain")


def test_the_gate_compares_with_the_version_holding_the_stage(registry_repo, git_remote):
    params = params_of(registry_repo, **{"promotion.margin": 0.05})
    metrics = record_model(registry_repo, b"a", {"anls": 0.3, "before": {"anls": 0.0}})
    registry.promote_if_better(registry_repo, params, metrics)
    metrics = record_model(registry_repo, b"b", {"anls": 0.34, "before": {"anls": 0.0}})
    outcome = registry.promote_if_better(registry_repo, params, metrics)
    assert not outcome.verdict.promote and outcome.verdict.against == "champion"
    assert outcome.verdict.baseline == 0.3 and holder(git_remote, params).version == "v0.0.1"

    metrics = record_model(registry_repo, b"c", {"anls": 0.36, "before": {"anls": 0.0}})
    outcome = registry.promote_if_better(registry_repo, params, metrics)
    assert outcome.verdict.promote and outcome.champion.version == "v0.0.1"
    assert holder(git_remote, params).version == "v0.0.2"


@pytest.mark.parametrize("dvc_remote", ["local", "s3"], indirect=True)
def test_a_version_is_fetched_from_the_dvc_remote_and_corrupt_bytes_are_refused(registry_repo, git_remote, dvc_remote,
                                                                                  tmp_path):  # fmt: skip
    params = params_of(registry_repo)
    metrics = record_model(registry_repo, b"weights one", {"anls": 0.3, "before": {"anls": 0.0}})
    registry.promote_if_better(registry_repo, params, metrics)
    version = holder(git_remote, params)
    target = registry.fetch(git_remote, params, version, tmp_path / "replica/v1")
    assert (target / "model.safetensors").read_bytes() == b"weights one"
    assert read_yaml(target / "registry.json")["version"] == "v0.0.1"

    dvc_remote.overwrite(b"weights one", b"weights onX")
    with pytest.raises(registry.RegistryError, match="does not match the hash DVC recorded"):
        registry.fetch(git_remote, params, version, tmp_path / "replica/again")
    assert not (tmp_path / "replica/again").exists()


def test_rollback_history_and_the_cli(registry_repo, git_remote, monkeypatch, capsys, tmp_path):
    params = params_of(registry_repo)
    for anls in (0.3, 0.4):
        metrics = record_model(registry_repo, str(anls).encode(), {"anls": anls, "before": {"anls": 0.0}})
        registry.promote_if_better(registry_repo, params, metrics)
    monkeypatch.chdir(registry_repo)

    assert main(["registry", "rollback", "v0.0.1"]) == 0
    assert holder(git_remote, params).version == "v0.0.1"
    # DVC's own client reads the tags alike: the last assignment holds the stage
    get = ["artifacts", "get", git_remote, "florence-docvqa", "--stage", "prod", "-o", str(tmp_path / "got")]
    subprocess.run([sys.executable, "-m", "dvc", *get], check=True, capture_output=True)
    assert (tmp_path / "got/model.safetensors").read_bytes() == b"0.3"
    with registry.registry_view(git_remote) as view:
        events = [(e["event"], e["version"]) for e in registry.history(view, params) if e["event"] == "assignment"]
    assert events == [("assignment", "v0.0.1"), ("assignment", "v0.0.2"), ("assignment", "v0.0.1")]

    capsys.readouterr()
    assert main(["registry", "show"]) == 0
    shown = capsys.readouterr().out
    assert "florence-docvqa#prod: v0.0.1" in shown and "0.4000" in shown
    assert main(["registry", "history"]) == 0
    assert capsys.readouterr().out.count("assignment") == 3

    assert main(["registry", "rollback", "v9.9.9"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown version 'v9.9.9' of florence-docvqa (known: v0.0.2, v0.0.1)"
    )
    assert main(["registry", "show", "--git-remote", str(registry_repo / "missing.git")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: git clone failed:") and "\n" not in error

    # a second version tagged by hand on a registered commit: GTO refuses the tags, the CLI says so in one line
    commit = holder(git_remote, params).commit
    subprocess.run(["git", "tag", "-a", "florence-docvqa@v0.0.9-rc", "-m", "by hand", commit], cwd=registry_repo,
                   check=True)  # fmt: skip
    for command in ("show", "history"):
        assert main(["registry", command, "--git-remote", str(registry_repo)]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: the registry's tags cannot be read: Multiple versions") and "\n" not in error


def test_without_a_git_remote_the_tags_stay_in_the_clone(registry_repo, git_remote, tmp_path):
    params = params_of(registry_repo, **{"registry.git_remote": ""})
    metrics = record_model(registry_repo, b"local", {"anls": 0.3, "before": {"anls": 0.0}})
    outcome = registry.promote_if_better(registry_repo, params, metrics)
    assert outcome.registered.version == "v0.0.1" and remote_tags(git_remote) == []
    assert git(registry_repo, "tag", "--list") == "florence-docvqa#prod#1\nflorence-docvqa@v0.0.1"
    target = registry.fetch(str(registry_repo), params, outcome.registered, tmp_path / "local-copy")
    assert (target / "model.safetensors").read_bytes() == b"local"


def test_a_fresh_clone_skips_when_the_version_holding_the_stage_was_trained_on_the_same_data_and_params(
    registry_repo, git_remote, tmp_path
):
    params = params_of(registry_repo)
    fingerprint = promotion.data_fingerprint(params, registry_repo)
    record = {"run_id": "run-1", "params": to_dict(params), "data_fingerprint": fingerprint}
    metrics = record_model(registry_repo, b"trained", {"anls": 0.3, "before": {"anls": 0.0}})
    registry.promote_if_better(registry_repo, params, metrics, {**record, "metrics": metrics})

    fresh = tmp_path / "pool-machine"  # a clean clone: no local champion record, only the registry's
    git(tmp_path, "clone", "--quiet", git_remote, str(fresh))
    champion = registry.champion_record(fresh, params_of(fresh))
    assert champion["run_id"] == "run-1" and champion["metrics"]["anls"] == 0.3
    reason = promotion.skip_reason(champion, promotion.data_fingerprint(params_of(fresh), fresh), params_of(fresh))
    assert reason and "unchanged since champion run run-1" in reason
    changed = params_of(fresh, lr=5e-4)
    assert promotion.skip_reason(champion, promotion.data_fingerprint(changed, fresh), changed) is None

    # a version registered without a run's record (by hand) holds none: the next run trains
    metrics = record_model(registry_repo, b"by hand", {"anls": 0.4, "before": {"anls": 0.0}})
    registry.promote_if_better(registry_repo, params, metrics)
    assert holder(git_remote, params).version == "v0.0.2" and registry.champion_record(fresh, params) is None

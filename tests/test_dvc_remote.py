"""Versioned data round-trip through the project's own DVC setup: `dvc repro` of the download stage (this repository's
dvc.yaml and params.yaml), `dvc push` to the remote that `.dvc/config` names, clone the git repo elsewhere, `dvc pull`:
every output restored byte for byte and the pipeline up to date, as README's "Data versioning" promises."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from florence_ops.params_file import apply_overrides, read_yaml
from tests.conftest import REPO, TINY_OVERRIDES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("git") is None or shutil.which("florence-ops") is None, reason="needs git and the CLI"
    ),
]


def run(cwd: Path, *command: str) -> str:
    """Run git or the dvc CLI (of this interpreter) in `cwd` without analytics or user-level config."""
    if command[0] == "dvc":
        command = (sys.executable, "-m", "dvc", *command[1:])
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(cwd.parent / "dvc-site-cache"),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def project_copy(root: Path) -> None:
    """A git repository with this project's package, dvc.yaml, DVC config and ignores, and params.yaml at tiny sizes."""
    shutil.copytree(REPO / "florence_ops", root / "florence_ops", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    params = apply_overrides(read_yaml(REPO / "params.yaml"), TINY_OVERRIDES)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(root, "git", "init", "-q")


def outputs(root: Path) -> dict[str, bytes]:
    """The download stage's outputs (data/raw, models/base) by path."""
    folders = [root / "data/raw", root / "models/base"]
    return {
        str(p.relative_to(root)): p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_push_clone_pull_restores_the_stage_outputs_and_the_pipeline_is_up_to_date(tmp_path):
    origin, clone = tmp_path / "origin", tmp_path / "clone"
    origin.mkdir()
    project_copy(origin)
    run(origin, "dvc", "repro", "-q", "download")
    run(origin, "git", "add", "-A")
    run(origin, "git", "commit", "-q", "-m", "download")
    run(origin, "dvc", "push", "-q")
    remote = tmp_path / "florence-ops-dvc-storage"  # `.dvc/config`: a folder beside the clone
    assert any(remote.rglob("*")), "dvc push sent nothing to the configured remote"

    run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    assert not (clone / "data/raw").exists() and not (clone / "models/base").exists()
    run(clone, "dvc", "pull", "download")

    pushed = outputs(origin)
    assert {"data/raw/train.parquet", "models/base/model.safetensors"} <= set(pushed)
    assert outputs(clone) == pushed
    assert json.loads(run(clone, "dvc", "status", "--json", "download")) == {}  # `dvc repro download`: nothing to do
    assert json.loads(run(clone, "dvc", "status", "--cloud", "--json", "download")) == {}

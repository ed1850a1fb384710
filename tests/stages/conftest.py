"""One tiny training run and its evaluation, shared by the train, evaluate and export tests; the files each stage
declares in dvc.yaml (`outs`, `metrics`, `plots`) and the files a stage actually wrote."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from florence_ops.params_file import read_yaml
from tests.conftest import REPO, tiny_params

PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PATHS = read_yaml(REPO / "params.yaml")["paths"]  # tiny_params keeps these, relative to the test's workspace
TRAINED = {"epochs": 4}  # 24 optimizer steps of 8 questions: the run whose loss curve and ANLS gain are pinned


def declared_outputs(stage: str) -> set[str]:
    """The paths that dvc.yaml lists as `stage`'s outs, metrics and plots, relative to the workspace."""
    entries = [e for kind in ("outs", "metrics", "plots") for e in PIPELINE[stage].get(kind, [])]
    names = [next(iter(e)) if isinstance(e, dict) else e for e in entries]
    return {re.sub(r"\$\{paths\.(\w+)\}", lambda m: PATHS[m.group(1)], name) for name in names}


def files(root: Path) -> dict[str, int]:
    """Every file under `root` (relative path -> modification time in ns); links are followed as files."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def written(root: Path, before: dict[str, int]) -> set[str]:
    """Files under `root` that are new or rewritten since `before` (a `files` snapshot); the one volatile name, the
    vision cache's key, is replaced by `*`."""
    after = files(root)
    changed = {path for path, mtime in after.items() if before.get(path) != mtime}
    return {re.sub(r"^\.cache/vision_features/[0-9a-f]+/", ".cache/vision_features/*/", path) for path in changed}


def under(paths: set[str], outputs: set[str]) -> set[str]:
    """The members of `paths` inside one of `outputs` (a file, or a folder and everything in it)."""
    return {p for p in paths if any(p == out or p.startswith(out + "/") for out in outputs)}


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory) -> tuple[Path, set[str]]:
    """A workspace where the train stage has run on the tiny params (read-only for tests), and the files it wrote."""
    from florence_ops.stages.train import train

    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(prepared, root, symlinks=True, dirs_exist_ok=True)
    before = files(root)
    train(tiny_params(root, **TRAINED))
    return root, written(root, before)


@pytest.fixture(scope="session")
def evaluated(trained, tmp_path_factory) -> tuple[Path, set[str], dict]:
    """`trained` after the evaluate stage (read-only for tests), the files evaluate wrote and the metrics."""
    from florence_ops.stages.evaluate import evaluate

    root = tmp_path_factory.mktemp("evaluated")
    shutil.copytree(trained[0], root, symlinks=True, dirs_exist_ok=True)
    before = files(root)
    metrics = evaluate(tiny_params(root, **TRAINED))
    return root, written(root, before), metrics

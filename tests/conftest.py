"""Shared fixtures: offline environment, tiny params, and a small pipeline workspace built once per session."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    DVC_NO_ANALYTICS="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    DO_NOT_TRACK="1",
    TOKENIZERS_PARALLELISM="false",
)

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds of CPU, large enough that every question type appears.
TINY_OVERRIDES = {
    "epochs": 2,
    "batch_size": 8,
    "data.synthetic.train_documents": 12,
    "data.synthetic.validation_documents": 4,
    "data.synthetic.test_documents": 2,
    "data.num_workers": 1,
    "train.checkpoint_every": 2,
    "train.max_eval_questions": 8,
    "evaluate.batch_size": 8,
    "train.max_answer_tokens": 8,  # and so the decoding budget: short untrained answers keep tests fast
}


def tiny_params(root: Path, **overrides):
    """Params of the repository's params.yaml with small sizes and every path under `root`."""
    return workspace_params(root, **{**TINY_OVERRIDES, **overrides})


def workspace_params(root: Path, **overrides):
    """Params of the repository's params.yaml with `overrides` and every path under `root`."""
    from florence_ops.config import Paths, load_params

    paths = {f"paths.{name}": str(root / value) for name, value in vars(Paths()).items()}
    return load_params(REPO / "params.yaml", {**paths, **overrides})


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A workspace where download and preprocess have run on the tiny params (shared, read-only for tests)."""
    from florence_ops.stages.download import download
    from florence_ops.stages.preprocess import preprocess

    root = tmp_path_factory.mktemp("prepared")
    params = tiny_params(root)
    download(params)
    preprocess(params)
    return root


@pytest.fixture
def workspace(prepared, tmp_path) -> Path:
    """A private copy of the prepared workspace that a test may train in and write to."""
    root = tmp_path / "ws"
    shutil.copytree(prepared, root, symlinks=True)
    return root


def disk_full_after(n_bytes: int):
    """A stand-in for shutil.copyfile on a full disk: writes `n_bytes` of the file, then fails with ENOSPC."""

    def copyfile(src, dst, *, follow_symlinks=True):
        Path(dst).write_bytes(Path(src).read_bytes()[:n_bytes])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    return copyfile

"""Shared fixtures: offline environment, tiny params, and a small pipeline workspace built once per session."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports Triton: its kernels (test_kernels.py) run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.remotes import s3_endpoint  # noqa: F401 (fixture of dvc_remote's "s3")

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


@dataclass(frozen=True)
class DvcRemote:
    """A DVC remote of the tests: a local folder, or a bucket of an S3 server (`endpoint`)."""

    url: str
    endpoint: str | None = None

    def add_to(self, repo: Path) -> None:
        """Make this remote the default DVC remote of the clone `repo` (the endpoint in .dvc/config, as for any
        S3-compatible server; the credentials stay in the environment)."""
        dvc = [sys.executable, "-m", "dvc", "remote"]
        subprocess.run([*dvc, "add", "--default", "storage", self.url], cwd=repo, check=True, capture_output=True)
        if self.endpoint:
            modify = [*dvc, "modify", "storage", "endpointurl", self.endpoint]
            subprocess.run(modify, cwd=repo, check=True, capture_output=True)

    def overwrite(self, content: bytes, data: bytes) -> None:
        """Replace the stored object of the file that held `content` with `data`, as a faulty store or a person
        would: DVC's record of it is left as it was."""
        md5 = hashlib.md5(content).hexdigest()
        if self.endpoint is None:
            stored = Path(self.url, "files/md5", md5[:2], md5[2:])
            stored.chmod(0o644)
            stored.write_bytes(data)
            return
        import boto3

        from benchmarks.pool_machines import boto_credentials

        bucket, _, prefix = self.url.removeprefix("s3://").partition("/")
        s3 = boto3.client("s3", endpoint_url=self.endpoint, **boto_credentials())
        key = f"{prefix}/files/md5/{md5[:2]}/{md5[2:]}"
        s3.head_object(Bucket=bucket, Key=key)  # the object is where DVC put it
        s3.put_object(Bucket=bucket, Key=key, Body=data)


@pytest.fixture(params=["local"])
def dvc_remote(request, tmp_path) -> DvcRemote:
    """The DVC remote: a local folder, or with the parameter "s3" (`indirect`) a bucket of a fresh S3 server."""
    if request.param == "s3":
        from benchmarks.pool_machines import BUCKET

        return DvcRemote(f"s3://{BUCKET}/dvc", request.getfixturevalue("s3_endpoint"))
    folder = tmp_path / "dvc-remote"
    folder.mkdir()
    return DvcRemote(str(folder))


@pytest.fixture
def git_remote(tmp_path) -> str:
    """A bare git repository, reached by URL as any git remote is."""
    bare = tmp_path / "registry.git"
    subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(bare)], check=True)
    return bare.as_uri()


@pytest.fixture
def registry_repo(tmp_path, git_remote, dvc_remote) -> Path:
    """A clone holding the project's `artifacts:` entry and an export stage (recorded, never run), with the project's
    params.yaml pointing `registry.git_remote` at `git_remote` and DVC's default remote at `dvc_remote`."""
    import yaml

    from florence_ops.params_file import read_yaml

    repo = tmp_path / "clone"
    repo.mkdir()
    run = functools.partial(subprocess.run, cwd=repo, check=True, capture_output=True)
    run(["git", "init", "--quiet"])
    run([sys.executable, "-m", "dvc", "init", "--quiet"])
    dvc_remote.add_to(repo)
    params = read_yaml(REPO / "params.yaml")  # YAML 1.2, as DVC and the stages read it
    params["registry"]["git_remote"] = "origin"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    metrics = [{"${paths.reports}/metrics.json": {"cache": False}}]
    export = {"cmd": "true", "outs": ["${paths.export}"], "metrics": metrics}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"export": export}, "artifacts": pipeline["artifacts"]}))
    record_model(repo, b"initial", {"anls": 0.0, "before": {"anls": 0.0}})
    run(["git", "add", "--all"])
    run(["git", "commit", "--quiet", "-m", "pipeline"])
    run(["git", "remote", "add", "origin", git_remote])
    run(["git", "push", "--quiet", "origin", "HEAD:refs/heads/main"])
    return repo


def record_model(repo: Path, weights: bytes | Path, metrics: dict) -> dict:
    """Put a model in the clone's `models/export` (a copy of a model directory, or one file of `weights`), its
    metrics in `reports/metrics.json`, and record them in dvc.lock as the export stage would (`dvc commit`)."""
    export = repo / "models/export"
    shutil.rmtree(export, ignore_errors=True)
    if isinstance(weights, Path):
        shutil.copytree(weights, export)
    else:
        export.mkdir(parents=True)
        (export / "model.safetensors").write_bytes(weights)
    (repo / "reports").mkdir(exist_ok=True)
    (repo / "reports/metrics.json").write_text(json.dumps(metrics))
    dvc_commit = [sys.executable, "-m", "dvc", "commit", "--force", "--quiet", "export"]
    subprocess.run(dvc_commit, cwd=repo, check=True, capture_output=True)
    return metrics

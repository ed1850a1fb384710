"""The pieces of a pool of retraining machines, started on one host as their users start them: an S3 server (moto),
a bare git remote holding the project, a Prefect server with a process work pool, and workers that each play one
machine (their own directory, HOME, temporary directory and DVC caches). Used by `pool_rehearsal.py` and the tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
BUCKET = "florence-ops"
POOL = "florence-ops"  # prefect.yaml's work pool
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "rehearsal",
    "AWS_SECRET_ACCESS_KEY": "rehearsal",
    "AWS_DEFAULT_REGION": "us-east-1",
}
PROJECT_FILES = ("florence_ops", "flows", "dvc.yaml", ".gitignore", ".dvcignore", "prefect.yaml", ".dvc/.gitignore")
QUIET = {"DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
GIT = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0"}
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on HOST that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_for(check, what: str, timeout_s: float, every_s: float = 0.5):
    """Call `check` until it returns something true; TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:g} s")


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` in a session of its own (stopped as one by `stop`), its output in `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop `process` and everything it started (its session), waiting up to 10 s before SIGKILL."""
    for member in [*psutil.Process(process.pid).children(recursive=True), process] if process.poll() is None else []:
        with suppress(ProcessLookupError):
            os.kill(member.pid, sig)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def machine_env(root: Path, api_url: str) -> dict[str, str]:
    """The environment of a worker machine: its own HOME, temporary directory (each run's clone) and DVC caches.

    The temporary directory is a short path of the system's (linked from the machine's folder as `tmp`): a server's
    multiprocessing manager puts a Unix socket there, and a socket path may not pass 107 bytes, which a folder deep in
    pytest's temporary tree does."""
    (root / "home").mkdir(parents=True, exist_ok=True)
    if not (root / "tmp").exists():
        (root / "tmp").symlink_to(tempfile.mkdtemp(prefix=f"florence-{root.name}-"))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "PYTHONPATH"))}
    identity = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", root.name), ("EMAIL", f"{root.name}@localhost"))}  # fmt: skip
    env.update(identity)  # the machine's git identity: the run's commit and the registry's tags name it
    tmp = str((root / "tmp").resolve())
    return {**env, **QUIET, **GIT, **S3_CREDENTIALS, "HOME": str(root / "home"), "TMPDIR": tmp,
            "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": api_url, "DVC_SITE_CACHE_DIR": str(root / "dvc"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip


@contextmanager
def s3_server(root: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`moto_server` on a free local port with the bucket BUCKET (created with boto3); yields its URL and process."""
    import boto3

    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    server = start([str(BIN / "moto_server"), "-H", HOST, "-p", str(port)], root / "moto.log", {**os.environ})
    try:
        wait_for(lambda: _answers(endpoint), "moto_server", 60)
        boto3.client("s3", endpoint_url=endpoint, **boto_credentials()).create_bucket(Bucket=BUCKET)
        yield endpoint, server
    finally:
        stop(server)


def boto_credentials() -> dict[str, str]:
    """boto3's keyword arguments for the S3 server's credentials."""
    keys = ("aws_access_key_id", "aws_secret_access_key", "region_name")
    return dict(zip(keys, S3_CREDENTIALS.values(), strict=True))


def s3_objects(endpoint: str) -> dict[str, str]:
    """Every object of BUCKET and its ETag."""
    import boto3

    pages = boto3.client("s3", endpoint_url=endpoint, **boto_credentials()).get_paginator("list_objects_v2")
    return {obj["Key"]: obj["ETag"] for page in pages.paginate(Bucket=BUCKET) for obj in page.get("Contents", [])}


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


@contextmanager
def prefect_server(root: Path) -> Iterator[str]:
    """`prefect server start` on a free local port with its own PREFECT_HOME; yields its API URL."""
    port = free_port()
    api_url = f"http://{HOST}:{port}/api"
    env = {**os.environ, **QUIET, "PREFECT_HOME": str(root / "prefect-server"), "PREFECT_API_URL": api_url}
    server = start([str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port), "--no-ui"],
                   root / "prefect-server.log", env)  # fmt: skip
    try:
        wait_for(lambda: _answers(f"{api_url}/health"), "prefect server start", 180)
        yield api_url
    finally:
        stop(server)


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run `command` to its end; its output, or RuntimeError with the command and the end of its output."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        said = (done.stdout + done.stderr).strip()[-2000:]
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{said}")
    return done.stdout


def git(cwd: Path, *args: str) -> str:
    """Run git in `cwd` (no user config)."""
    env = {**os.environ, **GIT, "GIT_AUTHOR_NAME": "rehearsal", "GIT_AUTHOR_EMAIL": "rehearsal@localhost"}
    env.update(GIT_COMMITTER_NAME="rehearsal", GIT_COMMITTER_EMAIL="rehearsal@localhost")
    return run(["git", *args], cwd, env)


def dvc(cwd: Path, *args: str) -> str:
    """Run the dvc CLI of this interpreter in `cwd`."""
    env = {**os.environ, **QUIET, "DVC_SITE_CACHE_DIR": str(cwd.parent / "dvc-site")}
    return run([sys.executable, "-m", "dvc", *args], cwd, env)


def git_remote(root: Path, params: dict, endpoint: str) -> tuple[Path, Path]:
    """A bare git remote whose main branch holds this project (`params` as params.yaml, the DVC remote on the S3
    server: URL and endpoint committed, credentials left to each machine's environment); returns it and the seed
    checkout it was pushed from."""
    origin, seed = root / "origin.git", root / "seed"
    git(root, "init", "-q", "--bare", "-b", "main", str(origin))
    seed.mkdir()
    for name in PROJECT_FILES:
        source, target = REPO / name, seed / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    (seed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(seed, "init", "-q", "-b", "main")
    (seed / ".dvc/config").write_text("[core]\n    analytics = false\n")
    dvc(seed, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
    dvc(seed, "remote", "modify", "storage", "endpointurl", endpoint)
    git(seed, "add", "-A")
    git(seed, "commit", "-q", "-m", "the project")
    git(seed, "remote", "add", "origin", origin.as_uri())
    git(seed, "push", "-q", "origin", "main")
    return origin, seed


def prefect_cli(cwd: Path, api_url: str, *args: str, **env: str) -> str:
    """Run the prefect CLI against `api_url` in `cwd`."""
    full_env = {**os.environ, **QUIET, "PREFECT_API_URL": api_url, **env}
    full_env["PREFECT_HOME"] = str(cwd.parent / "prefect-cli")
    return run([str(BIN / "prefect"), *args], cwd, full_env)


def start_worker(root: Path, name: str, api_url: str) -> subprocess.Popen:
    """`prefect worker start --pool POOL --limit 1` as machine `name` (one run at a time on it)."""
    machine = root / name
    env = {**machine_env(machine, api_url), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    command = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", name, "--limit", "1"]
    return start(command, machine / "worker.log", env, cwd=machine)

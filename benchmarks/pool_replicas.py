"""Serving replicas in the pool rehearsal: two `florence-ops serve --model registry:florence-docvqa#prod`, each in its
own directory as a user sets one up (params.yaml naming the git remote, its own HOME and DVC caches, the S3
credentials), a client asking both without pause, and a watch of what each one serves. Used by `pool_rehearsal.py`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from benchmarks import pool_machines as machines
from florence_ops.params_file import apply_overrides, read_yaml

REFERENCE = "registry:florence-docvqa#prod"
POLL_S = 2.0  # registry.poll_interval_s of the replicas
START_S = 300  # a replica's first fetch and load, on a busy machine
REQUEST_GAP_S = 0.3  # between the client's requests: it keeps asking without taking the CPU from the runs


class Replica:
    """One `florence-ops serve` following the registry, in `root` (its own HOME, caches, params.yaml)."""

    def __init__(self, root: Path, seed_params: dict, origin: Path, api_url: str):
        self.name, self.port = root.name, machines.free_port()
        self.url = f"http://{machines.HOST}:{self.port}"
        root.mkdir(parents=True)
        overrides = {"registry.git_remote": origin.as_uri(), "registry.poll_interval_s": POLL_S,
                     "registry.replica_dir": "models/replica", "serve.reload_interval_s": 0.5}  # fmt: skip
        (root / "params.yaml").write_text(yaml.safe_dump(apply_overrides(seed_params, overrides), sort_keys=False))
        env = {**machines.machine_env(root, api_url), "PYTHONPATH": str(machines.REPO)}  # this project's code
        command = [str(machines.BIN / "florence-ops"), "serve", "--model", REFERENCE, "--port", str(self.port)]
        self.process = machines.start(command, root / "serve.log", env, cwd=root)

    def health(self) -> dict | None:
        """`/healthz`'s body, or None when it does not answer 200."""
        try:
            response = httpx.get(f"{self.url}/healthz", timeout=5)
            return response.json() if response.status_code == 200 else None
        except httpx.HTTPError:
            return None

    def version(self) -> str | None:
        """The registry version it serves now."""
        return ((self.health() or {}).get("registry") or {}).get("version")


def _page() -> str:
    """A data URL of a small page with text, as a client sends it."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 200), "white")
    ImageDraw.Draw(image).text((20, 40), "INVOICE 2041\nTotal: 31.50", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Watch:
    """A client asking every replica in turn, and a watch of the versions served and of the git remote's tags."""

    def __init__(self, replicas: list[Replica], origin: Path):
        self.replicas, self.origin = replicas, origin
        self.requests: list[tuple[float, str, bool, str | None]] = []  # (time, replica, ok, version or error)
        self.served: dict[str, list[tuple[float, str | None]]] = {r.name: [] for r in replicas}  # version changes
        self.prod_tags: list[tuple[float, str]] = []  # when each assignment of prod appeared on the git remote
        self.stopping, self.looked = threading.Event(), threading.Event()
        self.threads = [threading.Thread(target=target, daemon=True) for target in (self._ask, self._look)]

    def __enter__(self) -> Watch:
        for thread in self.threads:
            thread.start()
        self.looked.wait(60)  # what each replica serves, and the tags, are known from here on
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _ask(self) -> None:
        content = [{"type": "text", "text": "What is the total?"}, {"type": "image_url", "image_url": {"url": _page()}}]
        body = {"model": "florence-ops", "messages": [{"role": "user", "content": content}]}
        while not self.stopping.is_set():
            for replica in self.replicas:
                try:
                    reply = httpx.post(f"{replica.url}/v1/chat/completions", json=body, timeout=120)
                    reply.raise_for_status()
                    self.requests.append((time.monotonic(), replica.name, True, reply.json()["system_fingerprint"]))
                except (httpx.HTTPError, KeyError, ValueError) as error:
                    self.requests.append((time.monotonic(), replica.name, False, repr(error)[:300]))
                time.sleep(REQUEST_GAP_S)

    def _look(self) -> None:
        while not self.stopping.is_set():
            tags = machines.git(self.origin, "tag", "--list", "*#prod#*").split()
            self.prod_tags += [(time.monotonic(), tag) for tag in tags if tag not in {t for _, t in self.prod_tags}]
            for replica in self.replicas:
                version, seen = replica.version(), self.served[replica.name]
                if version and (not seen or seen[-1][1] != version):
                    seen.append((time.monotonic(), version))
            self.looked.set()
            time.sleep(0.25)

    def versions(self) -> dict[str, str | None]:
        """The version each replica serves now."""
        return {name: seen[-1][1] if seen else None for name, seen in self.served.items()}

    def wait_moved(self, before: dict[str, str | None], timeout_s: float) -> None:
        """Wait until every replica serves another version than in `before`, the same one."""

        def moved() -> bool:
            now = self.versions()
            return len(set(now.values())) == 1 and all(now[name] != before[name] for name in now)

        machines.wait_for(moved, "the replicas serving the new version", timeout_s)

    def counts(self, since: float, until: float | None = None) -> dict[str, int]:
        """Requests sent and failed between `since` and `until` (monotonic times)."""
        window = [r for r in self.requests if r[0] >= since and (until is None or r[0] <= until)]
        return {"sent": len(window), "failed": sum(not ok for _, _, ok, _ in window)}

    def failures(self) -> list[str]:
        return [f"{name}: {said}" for _, name, ok, said in self.requests if not ok]

    def swap(self, before: dict[str, str | None], assigned_at: float, tag: str) -> dict:
        """How the replicas went from `before` to the version assigned at `assigned_at` by `tag`."""
        switched = {name: next(t for t, v in seen if t >= assigned_at and v != before[name])
                    for name, seen in self.served.items()}  # fmt: skip
        last = max(switched.values())
        return {"assignment": tag, "before": before, "after": self.versions(),
                "switch_s": {name: round(t - assigned_at, 1) for name, t in switched.items()},
                "poll_interval_s": POLL_S, "requests_during_swap": self.counts(assigned_at, last + 1)}  # fmt: skip


@contextmanager
def replicas_serving(root: Path, seed: Path, origin: Path, api_url: str):
    """Start the two replicas once a version holds prod; yield a running `Watch` of them; stop them at the end."""
    seed_params = read_yaml(seed / "params.yaml")
    replicas, started = [], time.monotonic()
    try:
        for name in ("replica-1", "replica-2"):
            replicas.append(Replica(root / name, seed_params, origin, api_url))
        for replica in replicas:
            machines.wait_for(replica.version, f"{replica.name} serving", START_S)
        ready_s = round(time.monotonic() - started, 1)
        with Watch(replicas, origin) as watch:
            watch.ready_s = ready_s
            yield watch
    finally:
        for replica in replicas:
            machines.stop(replica.process)


def latest_prod(watch: Watch, after: float) -> tuple[float, str]:
    """When and by which tag prod was assigned last, after `after`."""
    return machines.wait_for(lambda: next((t for t in reversed(watch.prod_tags) if t[0] >= after), None),
                             "an assignment of prod", 60)  # fmt: skip


def publish_corrupt_version(root: Path, origin: Path, endpoint: str) -> str:
    """As an operator would, from a clone: take the model holding prod, change its weights, register and assign it
    (bytes pushed to S3), then overwrite the new weights' object in the bucket with half of it. The version's name."""
    import boto3

    from florence_ops import registry
    from florence_ops.config import load_params

    clone = root / "operator"
    machines.git(root, "clone", "-q", origin.as_uri(), str(clone))
    params = load_params(clone / "params.yaml")
    held = registry.resolve(clone, params)
    machines.git(clone, "checkout", "-q", held.commit)
    machines.dvc(clone, "pull", "-q")
    weights = clone / params.paths.export / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a different model: its last weight's last byte
    weights.unlink()
    weights.write_bytes(bytes(data))
    machines.dvc(clone, "commit", "-q", "--force", "export")
    commit = registry.model_commit(clone, params, "a model whose weights are corrupt in the DVC remote")
    registry.push_model(clone, params)
    key = f"dvc/files/md5/{hashlib.md5(data).hexdigest()[:2]}/{hashlib.md5(data).hexdigest()[2:]}"
    s3 = boto3.client("s3", endpoint_url=endpoint, **machines.boto_credentials())
    s3.head_object(Bucket=machines.BUCKET, Key=key)  # the object exists where DVC put it
    s3.put_object(Bucket=machines.BUCKET, Key=key, Body=bytes(data[: len(data) // 2]))
    return registry.register(clone, params, commit).version


def operator_env() -> dict[str, str]:
    """What the rehearsal's own git, DVC and boto3 calls need: no user config, an identity, the S3 credentials."""
    identity = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", "operator"), ("EMAIL", "operator@localhost"))}  # fmt: skip
    return {**machines.GIT, **identity, **machines.S3_CREDENTIALS}


def run_fault(watch: Watch, root: Path, origin: Path, endpoint: str) -> dict:
    """A version corrupt in S3 takes prod: the replicas keep serving theirs and report the failed fetch."""
    before, started = watch.versions(), time.monotonic()
    os.environ.update(operator_env())
    version = publish_corrupt_version(root, origin, endpoint)
    assigned_at, tag = latest_prod(watch, started)

    def reported() -> dict | None:
        healths = {r.name: r.health() for r in watch.replicas}
        failed = {n: ((h or {}).get("registry") or {}).get("last_failed_fetch") for n, h in healths.items()}
        return healths if all(f and f["version"] == version for f in failed.values()) else None

    healths = machines.wait_for(reported, "the replicas reporting the failed fetch", 180, 1)
    reported_at = time.monotonic()
    time.sleep(POLL_S * 3)  # further polls change nothing
    return {"corrupt_version": version, "assignment": tag, "before": before, "after": watch.versions(),
            "reported_after_s": round(reported_at - assigned_at, 1),
            "last_failed_fetch": {n: h["registry"]["last_failed_fetch"] for n, h in healths.items()},
            "requests_since": watch.counts(assigned_at)}  # fmt: skip

"""What the server's processes know of each other: the model each worker serves, and whether it is alive.

Each model worker writes `worker-<id>.json` into the server's private runtime directory (on /dev/shm, see
`handoff.py`) whenever it loads a model or fails to: its pid, the version and metrics it serves (and the registry
version, for a fetched one), and the last load that failed. A replica that follows the registry (`replica.py`) writes
`replica.json` there: what it follows, its last failed fetch and its last failed poll. The HTTP processes read these
files to answer `/healthz` with what is actually served, and to answer 503 at once to the requests a worker had taken
when it died (`InFlightGuard`) instead of letting them wait.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from litserve.utils import LitAPIStatus

from florence_ops.artifacts import write_text_atomic
from florence_ops.processes import process_alive
from florence_ops.serving.supervision import POLL_S

log = logging.getLogger(__name__)
UNCLAIMED_GRACE_S = 10.0  # past serve.request_timeout_s, before a request no worker took is answered 504
RETRY_AFTER_S = 5  # what a 503 tells clients to wait: about the time a model worker takes to restart
LOST_AFTER_S = 1.0  # out of the queue and not announced by any worker this long: taken by a worker that died
REPLICA_FILE = "replica.json"


def write_worker_status(root: Path, worker_id: str, status: dict[str, Any]) -> None:
    """Replace worker `worker_id`'s status file in `root` (atomically: readers never see half of it)."""
    record = {"worker_id": worker_id, "pid": os.getpid(), **status}
    write_text_atomic(Path(root) / f"worker-{worker_id}.json", json.dumps(record))


def write_replica_status(root: Path, status: dict[str, Any]) -> None:
    """Replace the registry replica's status file in `root` (atomically)."""
    write_text_atomic(Path(root) / REPLICA_FILE, json.dumps(status))


def registry_status(root: Path, served: dict[str, Any]) -> dict[str, Any] | None:
    """`/healthz`'s `registry`: the registry version served (artifact, version, stage, tag, commit, metrics), what
    the replica follows, its last failed fetch and, until a poll succeeds again, its last failed poll; None when
    the model did not come from the registry."""
    try:
        replica = json.loads((Path(root) / REPLICA_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        replica = {}
    entry = served.get("registry") or {}
    if not replica and not entry:
        return None
    stages = entry.get("stages") or [None]
    return {"artifact": entry.get("artifact", replica.get("artifact")), "version": entry.get("version"),
            "stage": replica.get("stage", stages[0]), "tag": entry.get("tag"), "commit": entry.get("commit"),
            "metrics": entry.get("metrics"), "following": replica.get("following"),
            "last_failed_fetch": replica.get("last_failed_fetch"),
            "last_failed_check": replica.get("last_failed_check")}  # fmt: skip


def read_worker_statuses(root: Path) -> list[dict[str, Any]]:
    """Every worker's last status, by worker id, each with `alive` added."""
    statuses = []
    for path in sorted(Path(root).glob("worker-*.json")):
        try:
            status = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        statuses.append({**status, "alive": process_alive(int(status["pid"]))})
    return statuses


def health(root: Path, workers_ready: bool, expected_workers: int) -> tuple[int, dict[str, Any]]:
    """The status code and body of `/healthz`: 200 only when every model worker is up and serving a model."""
    statuses = read_worker_statuses(root)
    serving = [s for s in statuses if s["alive"] and s.get("version")]
    if workers_ready and len(serving) == expected_workers:
        state = "ok"
    else:
        state = "starting" if not statuses else "unavailable"
    versions = sorted({s["version"] for s in serving})
    first = serving[0] if serving else {}
    failed = [s["last_failed_load"] for s in statuses if s.get("last_failed_load")]
    body = {
        "status": state,
        "version": versions[0] if len(versions) == 1 else (versions or None),
        "model": first.get("model"),
        "metrics": first.get("metrics"),
        "metrics_source": first.get("metrics_source"),
        "loaded_at": first.get("loaded_at"),
        "last_failed_load": max(failed, key=lambda f: f["at"]) if failed else None,
        "registry": registry_status(root, first),
        "workers": [{key: s.get(key) for key in ("worker_id", "pid", "alive", "version")} for s in statuses],
    }
    return (200 if state == "ok" else 503), body


class InFlightGuard:
    """In an HTTP process: fails the requests a model worker had taken when it died, with 503, within `POLL_S`;
    those it took off the queue without announcing them, with 503 within `LOST_AFTER_S` of the queue being seen
    without them; and a request that no worker has taken `UNCLAIMED_GRACE_S` past `serve.request_timeout_s`, with
    504.

    LitServe tells an HTTP process which worker took a request (the worker's start message, sent when workers are
    restarted) but not that the worker died; requests still in the queue are left for its replacement. A worker
    killed between taking a request off the queue and announcing it leaves a request that nobody will answer. A live
    worker announces what it takes within milliseconds (through LitServe's default transport, its manager's queues,
    which lose nothing; not `fast_queue`'s ZeroMQ, which may drop a new socket's first messages), so a request that
    was waiting when a worker's death was seen, and that no worker has announced `LOST_AFTER_S` after the queue was
    seen empty (so out of it), was taken by the dead worker. One that is never seen out of the queue (it never
    empties) gets 504 when a worker would have answered it 504 had it still been queued that long."""

    def __init__(self, root: Path, response_buffer: dict, request_timeout_s: float, request_queue: Any):
        self.root, self.response_buffer, self.request_queue = Path(root), response_buffer, request_queue
        self.unclaimed_after_s = request_timeout_s + UNCLAIMED_GRACE_S
        self._unclaimed: dict[str, float] = {}  # uid -> when this process first saw it not taken by any worker
        self._deaths: set[tuple[str, int]] = set()  # (worker id, pid) of the dead workers seen last time
        self._suspects: dict[str, float | None] = {}  # uid -> when the queue was seen without it (None: not yet)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start watching, once per process (from within its event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                self.check(read_worker_statuses(self.root), time.monotonic())
            except Exception:  # one bad look must not end the watch for the process's life
                log.exception("could not check the model workers' requests")

    def check(self, statuses: list[dict[str, Any]], now: float) -> None:
        """One look at the workers' `statuses` (`read_worker_statuses`) and this process's requests, as of `now`."""
        deaths = {(str(s["worker_id"]), s["pid"]) for s in statuses if not s["alive"]}
        if deaths:
            self.fail_requests_of({worker_id for worker_id, _ in deaths})
        if deaths - self._deaths:  # what a worker that just died may have taken without announcing it
            self._suspects |= {uid: None for uid in self._waiting() if uid not in self._suspects}
        self._deaths = deaths
        self.fail_lost(now)
        self.fail_unclaimed(now)

    def fail_requests_of(self, dead: set[str]) -> None:
        """Answer 503 to every unanswered request taken by a worker in `dead`."""
        for uid, item in list(self.response_buffer.items()):
            if item.worker_id is not None and str(item.worker_id) in dead and not item.event.is_set():
                item.response = (_worker_died(), LitAPIStatus.ERROR)
                item.event.set()
                log.warning("request %s failed: its model worker %s died", uid, item.worker_id)

    def fail_lost(self, now: float) -> None:
        """Answer 503 to every request waiting when a worker died that is out of the queue, unannounced, since
        `LOST_AFTER_S` before `now`."""
        waiting = self._waiting()
        self._suspects = {uid: seen for uid, seen in self._suspects.items() if uid in waiting}
        if None in self._suspects.values() and self._queue_empty():
            self._suspects = {uid: now if seen is None else seen for uid, seen in self._suspects.items()}
        for uid, seen in list(self._suspects.items()):
            if seen is not None and now - seen >= LOST_AFTER_S:
                waiting[uid].response = (_worker_died(), LitAPIStatus.ERROR)
                waiting[uid].event.set()
                del self._suspects[uid]
                log.warning("request %s failed: a model worker died after taking it off the queue", uid)

    def fail_unclaimed(self, now: float) -> None:
        """Answer 504 to every request that no worker has taken for `unclaimed_after_s` (as of `now`)."""
        waiting = self._waiting()
        self._unclaimed = {uid: self._unclaimed.get(uid, now) for uid in waiting}
        for uid, since in self._unclaimed.items():
            if now - since > self.unclaimed_after_s:
                error = HTTPException(504, f"no model worker took this request within {self.unclaimed_after_s:.0f} s")
                waiting[uid].response = (error, LitAPIStatus.ERROR)
                waiting[uid].event.set()
                log.warning("request %s failed: no model worker took it within %.0f s", uid, self.unclaimed_after_s)

    def _waiting(self) -> dict[str, Any]:
        """This process's requests that no worker has announced and nothing has answered, by uid."""
        return {uid: item for uid, item in list(self.response_buffer.items())
                if item.worker_id is None and not item.event.is_set()}  # fmt: skip

    def _queue_empty(self) -> bool:
        try:
            return self.request_queue.empty()
        except (OSError, EOFError):  # the queue's manager is gone: the server is going down
            return False


def _worker_died() -> HTTPException:
    return HTTPException(503, "the model worker answering this request died; retry",
                         headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip

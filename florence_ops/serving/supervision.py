"""The server's processes as one unit: each one heals or the whole server goes down, and none outlives the server.

`florence-ops serve` is a main process (LitServe's: the request queue's manager, the response broker) with two kinds
of children: model workers (spawned) and HTTP processes (forked). What happens when one of them dies:

- **A model worker** is restarted by LitServe (`restart_workers`). Requests it had taken (its batch, and those it
  took ahead for the next one) are answered 503 at once by the HTTP processes (`health.InFlightGuard`), and one it
  had taken but not yet announced, once the queue is seen without it; requests still queued wait for the new worker.
  A worker that keeps dying (`MAX_WORKER_RESTARTS` within `RESTART_WINDOW_S`: a model that cannot load, memory it
  never gets) brings the server down instead.
- **An HTTP process** cannot be restarted by LitServe: the server goes down with one log line and exit status 1, so
  that its supervisor (systemd, Docker, Kubernetes) starts a fresh one.
- **The main process**: every child asks Linux to kill it when its parent dies (PR_SET_PDEATHSIG), so a killed
  server leaves no process holding the port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque

import litserve as ls

from florence_ops.processes import die_with_parent

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often the main process looks at its children
MAX_WORKER_RESTARTS = 5  # model-worker deaths tolerated within RESTART_WINDOW_S before the server gives up
RESTART_WINDOW_S = 300.0


def children_die_with_this_process() -> None:
    """Make every process forked from this one from now on die with it (HTTP processes, the queue's manager).

    They also ignore SIGTERM until they install handlers of their own (uvicorn does; the main process's handler is
    not theirs): a SIGTERM sent to the whole process group (systemd's default, `kill -- -PID`) must not take the
    queue's manager away while the main process shuts the others down through it."""
    parent = [os.getpid()]

    def remember() -> None:
        parent[0] = os.getpid()

    def in_child() -> None:
        die_with_parent(parent[0])
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    os.register_at_fork(before=remember, after_in_child=in_child)


def describe_exit(process) -> str:
    """`exit status 3` or `killed by SIGKILL` for a finished multiprocessing.Process."""
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


class SupervisedServer(ls.LitServer):
    """A LitServer whose model workers are restarted and whose HTTP processes are watched: `failure` says why the
    server stopped when one of its processes brought it down (None after a normal shutdown)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, restart_workers=True, **kwargs)
        self.monitor_internal = POLL_S  # LitServe's check of its model workers, 2 s by default
        self.failure: str | None = None
        self._stopping = threading.Event()
        self._monitors: list[threading.Thread] = []

    def _start_worker_monitoring(self, manager, uvicorn_workers) -> None:
        # LitServe's own monitor restarts the model workers; this one watches what it does not.
        before = set(threading.enumerate())
        super()._start_worker_monitoring(manager, uvicorn_workers)
        supervisor = threading.Thread(target=self._watch, args=(uvicorn_workers,), name="florence-ops-supervisor",
                                      daemon=True)  # fmt: skip
        supervisor.start()
        self._monitors = [*(set(threading.enumerate()) - before), supervisor]

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal") -> None:
        # Both monitors stop before the processes they watch are stopped: LitServe's would restart the model
        # workers, and then fail on the queue's manager once that is shut down.
        self._stopping.set()
        self._signal_shutdown()
        for monitor in self._monitors:
            if monitor is not threading.current_thread():
                monitor.join(timeout=2 * POLL_S + 1)
        super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)

    def _watch(self, uvicorn_workers: dict) -> None:
        restarts: deque[float] = deque()
        worker_pids = [worker.pid for worker in self.inference_workers]
        while not self._stopping.wait(POLL_S):
            for process in uvicorn_workers.values():
                if not process.is_alive():
                    name = f"HTTP process {process.name} (pid {process.pid})"
                    return self._fail(f"{name} died ({describe_exit(process)})")
            current = [worker.pid for worker in self.inference_workers]
            for old, new in zip(worker_pids, current):
                if old != new:
                    log.warning("model worker (pid %s) died and was restarted as pid %s", old, new)
                    restarts.append(time.monotonic())
            worker_pids = current
            while restarts and restarts[0] < time.monotonic() - RESTART_WINDOW_S:
                restarts.popleft()
            if len(restarts) > MAX_WORKER_RESTARTS:
                return self._fail(f"model workers died {len(restarts)} times within {RESTART_WINDOW_S:.0f} s")

    def _fail(self, reason: str) -> None:
        self.failure = reason
        log.error("%s: shutting the server down", reason)
        self._stopping.set()
        self._signal_shutdown()  # the main thread, waiting on it, then stops every process

    def _signal_shutdown(self) -> None:
        """Set LitServe's shutdown event, which lives in the manager process (which may be gone), from a thread of
        its own: a manager proxy talks over one connection per thread, and the main thread's may still be waiting
        on the event when Ctrl+C or SIGTERM interrupted it."""

        def signal_event() -> None:
            with contextlib.suppress(OSError, EOFError):
                self._shutdown_event.set()

        setter = threading.Thread(target=signal_event, name="florence-ops-shutdown", daemon=True)
        setter.start()
        setter.join(timeout=2)

"""A temporary Prefect server that dies with the process that started it, for `python flows/retrain.py`.

Without PREFECT_API_URL, Prefect starts its own temporary server as a child process and stops it at interpreter exit
only: a killed flow process leaves it running. This one is `prefect server start` (Prefect's public command) in a
child that the kernel signals when its parent dies (Linux's PR_SET_PDEATHSIG), SIGKILL included.
"""

from __future__ import annotations

import atexit
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from florence_ops.processes import dies_with_this_process

HOST = "127.0.0.1"
STOP_TIMEOUT_S = 5


def free_port() -> int:
    """A TCP port on HOST that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _wait_until_healthy(server: subprocess.Popen, api_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    ended = f"it exited with {server.returncode}" if server.poll() is not None else f"no answer in {timeout_s:g} s"
    raise RuntimeError(f"the temporary Prefect server on {api_url} did not start: {ended}")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def start_temporary_server() -> str:
    """Start a local Prefect server (no UI, no scheduler) for this process; return its API URL.

    It stops at interpreter exit, after Prefect has sent its last logs and events (Prefect drains them before the
    `atexit` hooks run), and the kernel stops it if this process is killed.
    """
    port = free_port()
    api_url = f"http://{HOST}:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port), "--no-ui",
               "--no-scheduler", "--no-late-runs", "--analytics-off", "--log-level", "WARNING"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, preexec_fn=dies_with_this_process())
    try:
        _wait_until_healthy(server, api_url, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    except BaseException:
        _stop(server)
        raise
    atexit.register(_stop, server)
    return api_url


@contextmanager
def prefect_api() -> Iterator[str]:
    """Point Prefect at the configured API (PREFECT_API_URL) or, without one, at a `start_temporary_server` within
    the block; yields the API URL."""
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    with temporary_settings({PREFECT_API_URL: start_temporary_server()}) as settings:
        yield settings.api.url

"""Kill each kind of process of `florence-ops serve` under load and measure what clients and operators see.

For each kind (model worker, HTTP process, the request queue's manager, the main process): start the server, loop
clients on it, SIGKILL one process of that kind, and record how long the server took to heal (a new worker serving:
`/healthz` 200 with another pid) or to exit, its exit status, the requests answered and failed meanwhile, and the
processes of the server still alive afterwards (orphans). Writes JSON.

    PYTHONPATH=. python benchmarks/serve_faults.py --model models/export --params params.yaml \\
        --out reports/benchmarks/serve_faults_cpu.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import psutil
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from florence_ops.artifacts import write_json  # noqa: E402

KINDS = ("worker", "http", "manager", "main")
SETTLE_S = 3.0  # clients run this long before the kill
AFTER_S = 3.0  # and this long after the server healed


def page_request(question: str) -> bytes:
    image = Image.new("RGB", (850, 1100), "white")
    ImageDraw.Draw(image).text((80, 80), "INVOICE INV-0042   Total: $12.50", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def group(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group `pgid`."""
    found = []
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == pgid:
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def victim(server: subprocess.Popen, kind: str) -> psutil.Process:
    """The process of `kind`: workers are spawned (spawn_main); of the forked children the manager comes first and
    the HTTP process last."""
    if kind == "main":
        return psutil.Process(server.pid)
    children = sorted(psutil.Process(server.pid).children(), key=lambda p: p.create_time())
    if kind == "worker":
        return next(p for p in children if "spawn_main" in " ".join(p.cmdline()))
    forked = [p for p in children if "florence-ops" in " ".join(p.cmdline())]
    return forked[0] if kind == "manager" else forked[-1]


class Clients:
    """`n` threads asking one question in a loop; each result is (time, HTTP status or error name)."""

    def __init__(self, port: int, n: int):
        self.url, self.body, self.results = f"http://127.0.0.1:{port}/v1/chat/completions", page_request("Total?"), []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]
        for thread in self.threads:
            thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            request = urllib.request.Request(self.url, data=self.body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    response.read()
                    status: int | str = response.status
            except urllib.error.HTTPError as error:
                status = error.code
            except OSError as error:
                status = type(error).__name__
                time.sleep(0.1)
            self.results.append((time.monotonic(), status))

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=150)


def run_kind(kind: str, args: argparse.Namespace, log_dir: Path) -> dict:
    port = free_port()
    log = (log_dir / f"serve-{kind}.log").open("wb")
    command = ["florence-ops", "serve", "--model", args.model, "--params", args.params, "--port", str(port)]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while health(port) is None or health(port)["status"] != "ok":
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"server for {kind} did not start; see {log.name}")
            time.sleep(0.2)
        clients = Clients(port, args.clients)
        time.sleep(SETTLE_S)
        target = victim(server, kind)
        killed_at = time.monotonic()
        target.send_signal(signal.SIGKILL)
        result: dict = {"kind": kind, "killed_pid": target.pid}
        if kind == "worker":
            while time.monotonic() - killed_at < 120:
                body = health(port)
                if body and body["status"] == "ok" and body["workers"][0]["pid"] != target.pid:
                    result["healed_s"] = round(time.monotonic() - killed_at, 2)
                    break
                time.sleep(0.05)
            time.sleep(AFTER_S)
            result["server_running"] = server.poll() is None
        else:
            while group(server.pid) and time.monotonic() - killed_at < 60:
                server.poll()
                time.sleep(0.05)
            result["all_processes_gone_s"] = round(time.monotonic() - killed_at, 2)
            result["exit_status"] = server.wait(timeout=5) if kind != "main" else "killed"
        clients.finish()
        after = [status for at, status in clients.results if at >= killed_at]
        result["requests_after_kill"] = dict(Counter(str(s) for s in after))
        failed = [at - killed_at for at, status in clients.results if at >= killed_at and status != 200]
        result["last_failure_after_kill_s"] = round(max(failed), 2) if failed else None
        if kind != "worker":  # the server is meant to be gone: anything of it still running is an orphan
            result["orphans"] = [" ".join(p.cmdline())[:120] for p in group(server.pid)]
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            result["port_free_after"] = kind == "worker" or sock.connect_ex(("127.0.0.1", port)) != 0
        text = Path(log.name).read_text(errors="replace")
        result["error_lines"] = [line for line in text.splitlines() if line.startswith("error:")]
        result["tracebacks_in_log"] = text.count("Traceback")
        return result
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serve-faults-") as logs:  # the servers' logs: what JSON keeps of them
        results = [run_kind(kind, args, Path(logs)) for kind in args.kinds]
    report = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor()
              or platform.machine(), "cpus": os.cpu_count(), "model": args.model, "clients": args.clients,
              "results": results}  # fmt: skip
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""`florence-ops serve` when its processes die, a new model is broken, or clients are slow: each process kind is
killed as the kernel's OOM killer would (SIGKILL), and the server must heal or exit promptly, leaving nothing behind."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from litserve.utils import ResponseBufferItem
from PIL import Image

from florence_ops.serving.health import LOST_AFTER_S, UNCLAIMED_GRACE_S, InFlightGuard, read_worker_statuses
from tests.serving.conftest import Server, data_url, free_port, png_bytes, raw_pages, write_params

HEAL_S = 60  # a model worker is restarted and loaded again within this (seconds)
EXIT_S = 10  # the whole server is gone within this after a process it cannot restart died


def ask_raw(server: Server, record: dict, timeout: float = 90) -> tuple[int | str, str]:
    """POST one question; (status, answer or error code), or (exception name, "") when no HTTP answer came."""
    content = [{"type": "text", "text": record["question"]},
               {"type": "image_url", "image_url": {"url": data_url(record["image"]["bytes"])}}]  # fmt: skip
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]["code"]
    except OSError as error:
        return type(error).__name__, ""


def children(server: Server, kind: str) -> list:
    """The server's model workers ("worker", spawned) or its HTTP process ("http": forked, as the queue's manager
    is, but last)."""
    main = server.process.pid
    found = sorted((p for p in server.processes() if p.ppid() == main), key=lambda p: p.create_time())
    if kind == "worker":
        return [p for p in found if "spawn_main" in " ".join(p.cmdline())]
    return [p for p in found if "florence-ops" in " ".join(p.cmdline())][-1:]


def wait_for(condition, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(step)
    return None


def healthy(server: Server) -> dict | None:
    try:
        return server.healthz()
    except OSError:
        return None


def serving_pid(health: dict) -> int | None:
    return (health.get("workers") or [{}])[0].get("pid")


@pytest.fixture
def start(served, tmp_path):
    running = []

    def start_server(**overrides) -> Server:
        open_files = overrides.pop("_files", None)
        params = write_params(tmp_path, **{"serve.max_batch_size": 4, "serve.batch_timeout_s": 0.01, **overrides})
        server = Server(served / "models/export", params, free_port(), open_files=open_files)
        running.append(server)
        return server

    yield start_server
    for server in running:
        server.stop()


def test_killed_model_worker_is_restarted_and_its_requests_get_503_at_once(served, start):
    server = start()
    records = raw_pages(served, "validation")[:8]
    expected = {r["questionId"]: ask_raw(server, r) for r in records}
    (worker,) = children(server, "worker")
    results, done = [], threading.Event()

    def client(offset: int) -> None:
        for i in range(offset, offset + 60):
            if done.is_set():
                return
            record = records[i % len(records)]
            results.append((record["questionId"], time.monotonic(), *ask_raw(server, record)))

    clients = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for thread in clients:
        thread.start()
    wait_for(lambda: len(results) >= 12, 60)
    killed_at = time.monotonic()
    worker.send_signal(signal.SIGKILL)
    health = wait_for(lambda: (h := healthy(server)) and serving_pid(h) not in (None, worker.pid) and h, HEAL_S)
    done.set()
    for thread in clients:
        thread.join(timeout=120)
    assert health and health["status"] == "ok", server.log.read_text()[-3000:]
    statuses = Counter(status for _, _, status, _ in results)
    assert set(statuses) <= {200, 503}, statuses  # no hang, no dropped connection
    for question, finished, status, answer in results:
        if status == 200:
            assert (status, answer) == expected[question]
        else:  # a request the dead worker had taken: answered at once, not after the restart
            assert answer == "unavailable" and finished - killed_at < 3, (finished - killed_at, answer)
    assert ask_raw(server, records[0]) == expected[records[0]["questionId"]]
    assert server.process.poll() is None


def test_killed_http_process_brings_the_whole_server_down_with_one_line(start):
    server = start()
    (http,) = children(server, "http")
    http.send_signal(signal.SIGKILL)
    code = wait_for(lambda: server.process.poll(), EXIT_S)
    log = server.log.read_text()
    assert code == 1, log[-3000:]
    assert f"error: the server stopped: HTTP process LitServer-0 (pid {http.pid}) died (killed by SIGKILL)" in log
    assert wait_for(lambda: not server.processes(), 5), [p.cmdline() for p in server.processes()]


def test_killed_main_process_takes_every_child_with_it(start):
    server = start()
    assert len(server.processes()) >= 3  # main, model worker, HTTP process (and the queue's manager)
    server.process.send_signal(signal.SIGKILL)
    assert wait_for(lambda: not server.processes(), 5), [p.cmdline() for p in server.processes()]
    assert wait_for(lambda: can_listen(server.port), 5)  # a restarted server can take the port


def can_listen(port: int) -> bool:
    """Whether a server can listen on `port` now (binding as uvicorn does, with SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_broken_new_model_keeps_the_old_one_served_and_healthz_says_so(served, start, tmp_path):
    model = tmp_path / "champion"
    shutil.copytree(served / "models/export", model)
    params = write_params(tmp_path, **{"serve.reload_interval_s": 0.2})
    server = Server(model, params, free_port())
    try:
        before = server.healthz()
        (model / "model.safetensors").write_bytes(b"not weights")  # a promotion whose weights are broken
        health = wait_for(lambda: (h := server.healthz())["last_failed_load"] and h, 30)
        time.sleep(3)
        after = server.healthz()
    finally:
        server.stop()
    assert health["status"] == "ok" and health["version"] == before["version"]  # still serving the old model
    failed = after["last_failed_load"]
    assert failed["version"] != before["version"] and "safetensor" in failed["error"].lower()
    assert failed["attempts"] <= 4, failed  # backing off: 0.4, 0.8, 1.6, 3.2 s, not every 0.2 s
    # Every failed attempt is logged; one more may have failed between the last health read and the stop.
    assert failed["attempts"] <= server.log.read_text().count("not loaded") <= failed["attempts"] + 1


def test_slow_clients_do_not_lock_others_out(start):
    # 1,100 connections that never finish their headers against 1,024 open files: without a header timeout they
    # hold every file for ever and no one else is answered.
    server = start(**{"serve.header_timeout_s": 2.0, "_files": 1024})
    slow = []
    try:
        for _ in range(1100):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        assert wait_for(lambda: healthy(server), 15), "no answer while slow clients held their connections"
        slow[0].settimeout(5)
        assert slow[0].recv(200).startswith(b"HTTP/1.1 408")
    finally:
        for sock in slow:
            sock.close()


def test_a_body_that_never_arrives_gets_408(start):
    server = start(**{"serve.body_timeout_s": 1.0})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\"")  # fmt: skip
        started = time.monotonic()
        reply = read_response(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b"serve.body_timeout_s" in reply
    assert time.monotonic() - started < 5


def test_a_burst_of_large_pages_does_not_leave_the_http_process_large(start):
    server = start(**{"serve.max_image_pixels": 50_000_000})
    (http,) = children(server, "http")
    before = http.memory_info().rss
    page = np.full((7000, 7000, 3), 255, np.uint8)
    page[::40] = 0  # lines, so that the PNG is small to send and takes a full decode
    record = {"question": "What is the total?", "image": {"bytes": png_bytes(Image.fromarray(page))}}
    with ThreadPoolExecutor(16) as pool:
        statuses = [status for status, _ in pool.map(lambda _: ask_raw(server, record), range(16))]
    grown = (http.memory_info().rss - before) / 2**20
    assert statuses == [200] * 16
    assert grown < 250, f"the HTTP process kept {grown:.0f} MiB after decoding 16 pages of 49 MP at once"


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (head and a Content-Length body) from `sock`, however the server splits it."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(4096)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    while len(body) < length and (chunk := sock.recv(4096)):
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_request_no_worker_took_is_answered_504_after_the_request_timeout(tmp_path):
    """A worker that dies between taking a request off the queue and announcing it leaves a request nobody would
    answer: the HTTP process answers it as a worker answers one queued too long."""
    import asyncio

    lost, taken = ResponseBufferItem(asyncio.Event()), ResponseBufferItem(asyncio.Event(), worker_id=0)
    guard = InFlightGuard(tmp_path, {"lost": lost, "taken": taken}, request_timeout_s=60.0, request_queue=queue.Queue())
    guard.fail_unclaimed(100.0)
    guard.fail_unclaimed(100.0 + 60.0 + UNCLAIMED_GRACE_S - 1)
    assert not lost.event.is_set()  # still within the request timeout and its grace
    guard.fail_unclaimed(100.0 + 60.0 + UNCLAIMED_GRACE_S + 1)
    assert lost.event.is_set() and lost.response[0].status_code == 504
    assert not taken.event.is_set()  # a worker's own: answered by it, or 503 if it dies


def test_a_request_a_dying_worker_took_without_announcing_it_gets_503_once_the_queue_is_seen_without_it(tmp_path):
    """The worker was killed after taking `lost` off the queue, before its announcement went out: once the queue is
    seen without it and no worker announces it for `LOST_AFTER_S`, it gets the 503 of its worker's other requests,
    not a 504 a minute later. Requests still queued, and those made after the death was seen, are left alone."""
    import asyncio

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "worker-0.json").write_text(json.dumps({"worker_id": "0", "pid": dead.pid, "version": "v1"}))
    requests = queue.Queue()
    requests.put("queued")
    buffer = {uid: ResponseBufferItem(asyncio.Event()) for uid in ("lost", "queued")}
    buffer["taken"] = ResponseBufferItem(asyncio.Event(), worker_id=0)
    guard = InFlightGuard(tmp_path, buffer, request_timeout_s=60.0, request_queue=requests)

    guard.check(read_worker_statuses(tmp_path), 100.0)  # the death seen, `queued` still in the queue
    assert buffer["taken"].event.is_set() and buffer["taken"].response[0].status_code == 503
    guard.check(read_worker_statuses(tmp_path), 105.0)
    assert not buffer["lost"].event.is_set()  # it might be in the queue yet

    # the replacement loads, takes `queued` and announces it; a request is made after the death was seen
    (tmp_path / "worker-0.json").write_text(json.dumps({"worker_id": "0", "pid": os.getpid(), "version": "v1"}))
    requests.get()
    buffer["queued"].worker_id = 0
    buffer["later"] = ResponseBufferItem(asyncio.Event())
    guard.check(read_worker_statuses(tmp_path), 106.0)  # the queue seen empty
    guard.check(read_worker_statuses(tmp_path), 106.0 + LOST_AFTER_S / 2)
    assert not buffer["lost"].event.is_set()  # an announcement may be on its way
    guard.check(read_worker_statuses(tmp_path), 106.0 + LOST_AFTER_S)
    assert buffer["lost"].event.is_set(), "a request the dead worker took unannounced is left to wait"
    error = buffer["lost"].response[0]
    assert (error.status_code, error.headers["Retry-After"]) == (503, "5")
    guard.check(read_worker_statuses(tmp_path), 120.0)
    assert not buffer["queued"].event.is_set() and not buffer["later"].event.is_set()

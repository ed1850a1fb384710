"""How a model worker collects a batch (`batching.GreedyLoop`): every request already queued, at once, up to
`serve.max_batch_size`; waiting for the first request when none is queued (not spinning); waiting up to
`serve.batch_timeout_s` for a batch to fill only when that is set; and taking the next batch's requests off the
queue while a batch runs, each announced to its HTTP process as the worker's."""

from __future__ import annotations

import queue
import threading
import time

import litserve as ls
import pytest
from litserve.utils import LitAPIStatus

from florence_ops.serving.batching import IDLE_WAIT_S, GreedyLoop

TIMEOUT_S = 1.0  # a batch timeout long enough to show in the elapsed time


running: list[GreedyLoop] = []


@pytest.fixture(autouse=True)
def close_loops():
    """Stop each test's prefetching thread, as a worker's exit does."""
    yield
    while running:
        running.pop().close()


class Transport:
    """What a worker sends to the HTTP processes: LitServe's start message for each request it takes."""

    def __init__(self, fail: bool = False):
        self.started, self.fail = [], fail

    def send(self, item: tuple, consumer_id: int) -> None:
        uid, (_, status, _, _) = item
        if self.fail:
            raise ConnectionError("transport closed")
        if status == LitAPIStatus.START:
            self.started.append(uid)


class Worker:
    """A worker's batching: its request queue, LitServe's batching settings, and what it tells the HTTP processes
    (LitServe sends a start message per request when workers are restarted, as the server's are)."""

    def __init__(self, batch_timeout: float = 0.0, transport: Transport | None = None, prefetch: bool = True):
        self.requests = queue.Queue()
        self.api = ls.LitAPI(max_batch_size=8, batch_timeout=batch_timeout)
        self.api.request_timeout = 60  # LitServer sets it from its `timeout`
        self.loop = GreedyLoop(prefetch)
        self.loop._restart_workers = True
        self.transport = transport or Transport()
        running.append(self.loop)

    def ask(self, count: int, after_s: float = 0.0) -> None:
        """Queue `count` requests, after `after_s` (from a thread) when given."""

        def put() -> None:
            time.sleep(after_s)
            for _ in range(count):
                self.requests.put((0, f"uid-{time.monotonic_ns()}", time.monotonic(), {"question": "q"}))

        if after_s:
            threading.Thread(target=put).start()
        else:
            put()

    def batch(self) -> tuple[int, float]:
        """The size of the next batch and how long collecting it took."""
        begin = time.monotonic()
        batch, timed_out = self.loop.get_batch_requests(self.api, self.requests, self.transport)
        assert timed_out == []
        return len(batch), time.monotonic() - begin


def test_a_free_worker_takes_every_queued_request_at_once():
    worker = Worker()
    worker.ask(5)
    size, elapsed = worker.batch()
    assert size == 5 and elapsed < 0.02


def test_with_nothing_queued_the_worker_waits_for_the_next_request_without_spinning():
    worker = Worker()
    size, elapsed = worker.batch()
    assert size == 0 and elapsed >= IDLE_WAIT_S * 0.9  # no busy loop on an empty queue
    worker.ask(1, after_s=IDLE_WAIT_S / 2)
    size, elapsed = worker.batch()
    assert size == 1 and elapsed < IDLE_WAIT_S


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize(("first", "later", "waits_s"), [(2, 3, TIMEOUT_S), (1, 7, TIMEOUT_S / 4)])
def test_a_batch_timeout_waits_for_the_batch_to_fill_and_no_longer(prefetch, first, later, waits_s):
    worker = Worker(batch_timeout=TIMEOUT_S, prefetch=prefetch)
    worker.ask(first)
    worker.ask(later, after_s=TIMEOUT_S / 4)  # 5 of 8 by the timeout, or the full 8 a quarter into it
    size, elapsed = worker.batch()
    assert size == first + later and waits_s * 0.9 < elapsed < waits_s * 2


@pytest.mark.parametrize("batch_timeout", [0.0, TIMEOUT_S])
def test_a_batch_is_never_larger_than_max_batch_size(batch_timeout):
    worker = Worker(batch_timeout)
    worker.ask(20)
    assert [worker.batch()[0] for _ in range(3)] == [8, 8, 4]


def test_requests_arriving_while_a_batch_runs_are_taken_and_announced_before_it_ends():
    worker = Worker()
    worker.ask(1)
    assert worker.batch()[0] == 1  # the batch runs from here on
    worker.ask(5)
    deadline = time.monotonic() + 2
    while (not worker.requests.empty() or len(worker.transport.started) < 6) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert worker.requests.empty() and len(worker.transport.started) == 6  # held by this worker, as its HTTP
    size, elapsed = worker.batch()  # processes know: a death now answers them 503
    assert size == 5 and elapsed < 0.02


def test_the_worker_never_takes_more_than_its_next_batch_ahead():
    worker = Worker()
    worker.ask(1)
    assert worker.batch()[0] == 1
    worker.ask(20)
    time.sleep(0.2)
    assert worker.requests.qsize() == 20 - 8  # the rest stay queued for a worker that is free
    assert [worker.batch()[0] for _ in range(3)] == [8, 8, 4]


def test_a_failure_to_take_requests_fails_the_next_batch():
    worker = Worker(transport=Transport(fail=True))
    worker.ask(1)
    with pytest.raises(RuntimeError, match="prefetching failed"):
        worker.batch()


def test_without_prefetching_a_busy_worker_leaves_the_queue_to_free_ones():
    worker = Worker(prefetch=False)  # what a server with several model workers runs
    worker.ask(1)
    assert worker.batch()[0] == 1
    worker.ask(5)
    time.sleep(0.2)
    assert worker.requests.qsize() == 5 and len(worker.transport.started) == 1


def test_a_request_taken_ahead_that_outwaits_the_request_timeout_is_answered_late_not_batched():
    """The thread takes the next batch's requests while a batch runs; one that has waited past LitServe's
    `request_timeout` by the time its batch starts is returned as timed out (LitServe answers it 504), as LitServe
    judges the requests it takes itself, and one still on time goes into the batch."""
    worker = Worker()
    worker.api.request_timeout = 1.0
    worker.ask(1)
    assert worker.batch()[0] == 1  # a batch runs from here on
    worker.ask(2)
    time.sleep(0.8)
    worker.ask(1)  # on time when the batch below starts
    time.sleep(0.5)  # the first two have waited 1.3 s
    assert worker.requests.empty(), "all three taken ahead"
    batch, timed_out = worker.loop.get_batch_requests(worker.api, worker.requests, worker.transport)
    assert len(batch) == 1 and len(timed_out) == 2
    assert {uid for _, uid in timed_out}.isdisjoint(uid for _, uid, _ in batch)
    assert worker.loop._arrived == {}, "nothing kept of the requests handed over"

"""How a model worker collects a batch (`worker.GreedyLoop`): every request already queued, at once, up to
`serve.max_batch_size`; waiting for the first request when none is queued (not spinning); and waiting up to
`serve.batch_timeout_s` for a batch to fill only when that is set."""

from __future__ import annotations

import queue
import threading
import time

import litserve as ls
import pytest

from florence_ops.serving.worker import IDLE_WAIT_S, GreedyLoop

TIMEOUT_S = 1.0  # a batch timeout long enough to show in the elapsed time


class Worker:
    """A worker's batching: its request queue and LitServe's batching settings."""

    def __init__(self, batch_timeout: float = 0.0):
        self.requests = queue.Queue()
        self.api = ls.LitAPI(max_batch_size=8, batch_timeout=batch_timeout)
        self.api.request_timeout = 60  # LitServer sets it from its `timeout`
        self.loop = GreedyLoop()

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
        batch, timed_out = self.loop.get_batch_requests(self.api, self.requests, transport=None)
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


def test_a_batch_timeout_waits_for_the_batch_to_fill():
    worker = Worker(batch_timeout=TIMEOUT_S)
    worker.ask(2)
    worker.ask(3, after_s=TIMEOUT_S / 4)
    size, elapsed = worker.batch()
    assert size == 5 and TIMEOUT_S * 0.9 < elapsed < TIMEOUT_S * 2


@pytest.mark.parametrize("batch_timeout", [0.0, TIMEOUT_S])
def test_a_batch_is_never_larger_than_max_batch_size(batch_timeout):
    worker = Worker(batch_timeout)
    worker.ask(20)
    assert [worker.batch()[0] for _ in range(3)] == [8, 8, 4]

"""How a model worker collects its batches: `GreedyLoop`, LitServe's batched loop made greedy and prefetching.

LitServe runs the loop in each model worker process; the API (`worker.DocVQAAPI`) is handed one when it is made.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import litserve as ls
from litserve.loops import BatchedLoop
from litserve.loops.base import _StopLoopError, collate_requests

IDLE_WAIT_S = 0.05  # a worker with nothing queued waits this long for a request before LitServe's loop goes round


class GreedyLoop(BatchedLoop):
    """LitServe's batched loop, greedy and prefetching: a free worker starts a batch with every request already
    queued (up to `serve.max_batch_size`) instead of waiting for more, unless `serve.batch_timeout_s` asks it to; and
    while a batch runs, a thread of the worker takes the requests arriving for the next one off LitServe's queue.

    Requests that arrive while a batch runs make up the next one, so the batch in flight is what gathers a batch,
    and the device is never idle while a request waits. Clients that each ask again when answered settle into
    batches that take turns on the device, the pages of one decoded by the HTTP processes while the other is
    answered. Waiting for a batch to fill (a timeout) leaves the device idle meanwhile; it only pays where a batch
    costs nearly the same whatever its size. With an empty queue the worker waits for the next request, in slices
    of `IDLE_WAIT_S`, as LitServe's own collation does.

    Taking a request off LitServe's queue is a round trip to its manager process; one by one, a batch's worth
    costs milliseconds that would otherwise come between two batches. The thread takes them as they arrive, at
    most one batch ahead, with LitServe's `collate_requests`: each request taken is announced to its HTTP process
    as this worker's at once, so a worker that dies holding it still gets it answered 503 (`InFlightGuard`).
    Prefetching is for a server with one model worker (`prefetch`, set by `build_server`): where there are
    several, a busy worker leaves the queue to the free ones.
    """

    def __init__(self, prefetch: bool = True):
        super().__init__()
        self.prefetch = prefetch
        self._prefetch_state()

    def _prefetch_state(self) -> None:
        self._lock = threading.Condition()  # guards what follows, and signals changes to it
        self._held: list = []  # requests the thread took, not yet in a batch
        self._arrived: dict[str, float] = {}  # when each held request was made (time.monotonic(), by its uid)
        self._late: list = []  # requests it found past `request_timeout`
        self._in_hand = 0  # requests it got from the queue and has not yet put in `_held`
        self._stopped = False  # it met LitServe's stop sentinel, or `close` was called
        self._failure: BaseException | None = None  # what ended it otherwise
        self._collector: threading.Thread | None = None
        self._sending = threading.Lock()  # LitServe's ZeroMQ socket is one per process and not thread-safe

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for each worker process (LitServe spawns them) without the thread and its locks."""
        keep = {"_lock", "_held", "_arrived", "_late", "_in_hand", "_stopped", "_failure", "_collector", "_sending"}
        return {key: value for key, value in self.__dict__.items() if key not in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._prefetch_state()

    def close(self) -> None:
        """Stop the prefetching thread (a worker's process ends it by exiting)."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    def put_response(self, *args, **kwargs) -> None:
        """LitServe's `put_response`, one thread at a time."""
        with self._sending:
            super().put_response(*args, **kwargs)

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue, transport) -> tuple[list, list]:
        """The requests the thread holds and those still queued (or arriving within `batch_timeout_s`), up to
        `max_batch_size`; waits up to `IDLE_WAIT_S` for a first request."""
        if not self.prefetch:
            return self._collate(lit_api, request_queue, transport)
        if self._collector is None:
            self._collector = threading.Thread(target=self._collect, args=(lit_api, request_queue, transport),
                                               name="request-prefetch", daemon=True)  # fmt: skip
            self._collector.start()
        size = lit_api.max_batch_size
        with self._lock:
            self._lock.wait_for(lambda: self._held or self._late or self._stopped, timeout=IDLE_WAIT_S)
            batch, late = self._take(size, lit_api.request_timeout)
            if batch and lit_api.batch_timeout > 0:  # the thread fills the batch meanwhile
                self._lock.wait_for(lambda: len(batch) + len(self._held) >= size or self._stopped,
                                    timeout=lit_api.batch_timeout)  # fmt: skip
                more, later = self._take(size - len(batch), lit_api.request_timeout)
                return batch + more, late + later
        if batch and len(batch) < size:  # whatever else is queued now, alongside the thread
            more, later = collate_requests(self, _collating(lit_api, size - len(batch), 0), request_queue, transport)
            with self._lock:
                self._lock.wait_for(lambda: not self._in_hand)  # a request the thread is taking joins this batch
                rest, latest = self._take(size - len(batch) - len(more), lit_api.request_timeout)
            batch, late = batch + more + rest, late + later + latest
        return batch, late

    def _collate(self, lit_api: ls.LitAPI, request_queue, transport) -> tuple[list, list]:
        """Without prefetching: LitServe's `collate_requests` for the first request, then for those already queued
        (or arriving within `batch_timeout_s`)."""
        batch, timed_out = collate_requests(self, _collating(lit_api, 1, IDLE_WAIT_S), request_queue, transport)
        if batch and lit_api.max_batch_size > 1:
            more, late = collate_requests(self, _collating(lit_api, lit_api.max_batch_size - 1, lit_api.batch_timeout),
                                          request_queue, transport)  # fmt: skip
            batch, timed_out = batch + more, timed_out + late
        return batch, timed_out

    def _take(self, count: int, request_timeout: float) -> tuple[list, list]:
        """Up to `count` held requests and every late one (with the lock held); raises when LitServe stopped.

        A request that has waited past `request_timeout` since it was made is late even if it was on time when the
        thread took it (a batch ran meanwhile), as LitServe judges the requests it takes itself."""
        if self._failure is not None:
            raise RuntimeError("the worker's request prefetching failed") from self._failure
        if self._stopped:
            raise _StopLoopError()
        if request_timeout not in (-1, False):  # LitServe's values for no timeout
            now, waiting = time.monotonic(), []
            for request in self._held:  # (response_queue_id, uid, request)
                if now - self._arrived[request[1]] > request_timeout:
                    self._late.append(request[:2])  # (response_queue_id, uid), as LitServe lists the late
                else:
                    waiting.append(request)
            self._held = waiting
        batch, self._held = self._held[:count], self._held[count:]
        late, self._late = self._late, []
        for request in batch:
            self._arrived.pop(request[1], None)
        for _, uid in late:
            self._arrived.pop(uid, None)
        self._lock.notify_all()  # room for the thread to take more
        return batch, late

    def _collect(self, lit_api: ls.LitAPI, request_queue, transport) -> None:
        """Take requests off LitServe's queue as they arrive, one batch ahead at most (runs in a daemon thread)."""
        queue = _Counted(request_queue, self)
        one = _collating(lit_api, 1, IDLE_WAIT_S)
        while True:
            with self._lock:
                self._lock.wait_for(lambda: len(self._held) < lit_api.max_batch_size or self._stopped)
                if self._stopped:
                    return
            batch, late, stopped, failure = [], [], False, None
            try:
                batch, late = collate_requests(self, one, queue, transport)
            except _StopLoopError:
                stopped = True
            except BaseException as error:  # the worker raises it with its next batch; LitServe restarts it
                failure = error
            with self._lock:
                self._held += batch
                self._late += late
                self._in_hand = 0
                self._stopped = self._stopped or stopped or failure is not None
                self._failure = failure
                self._lock.notify_all()


class _Counted:
    """LitServe's request queue as the prefetching thread reads it: what it gets counts as in hand until held."""

    def __init__(self, requests, loop: GreedyLoop):
        self.requests, self.loop = requests, loop

    def get(self, timeout: float | None = None):
        item = self.requests.get(timeout=timeout)
        with self.loop._lock:
            self.loop._in_hand += 1
            _, uid, made, _ = item  # LitServe's stop sentinel is four Nones
            if uid is not None:
                self.loop._arrived[uid] = made
        return item


def _collating(lit_api: ls.LitAPI, max_batch_size: int, batch_timeout: float) -> SimpleNamespace:
    """What `collate_requests` reads of the API, with another batch size and timeout."""
    return SimpleNamespace(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                           request_timeout=lit_api.request_timeout, stream=lit_api.stream)  # fmt: skip

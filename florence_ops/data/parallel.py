"""An ordered map over worker processes with bounded work in flight, shared by the download and preprocess stages.

Results come back in input order, so what a stage writes does not depend on the number of workers. Workers are
forked: they run pure functions of PIL, numpy and pyarrow, and callers need no `if __name__ == "__main__"` guard
(forkserver and spawn re-import the main module).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
CHUNKS_PER_WORKER = 2  # chunks in flight per worker: enough to keep each busy, few enough to bound memory


def worker_count(num_workers: int) -> int:
    """The processes that `data.num_workers` asks for: itself, or one per CPU core when it is 0."""
    if num_workers:
        return num_workers
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(len(cores), 1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, chunksize: int = 1) -> Iterator[R]:
    """`map(fn, items)` computed by `workers` processes (in this one when `workers` is 1), in input order.

    Items travel `chunksize` at a time; at most `CHUNKS_PER_WORKER * workers` chunks are in flight, so memory stays
    flat however many items there are. A worker that dies raises here instead of hanging.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        in_flight: deque[Future[list[R]]] = deque()
        for chunk in batched(items, chunksize):
            in_flight.append(pool.submit(_map_chunk, fn, chunk))
            if len(in_flight) >= CHUNKS_PER_WORKER * workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive items (the last one shorter), as `itertools.batched` of Python 3.12."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _map_chunk(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [fn(item) for item in chunk]

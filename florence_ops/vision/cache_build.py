"""Building the vision-feature cache (`cache.py` reads it): by one process, or by all the processes of a machine
together, each encoding a contiguous share of whole batches into the same file; either way the same bytes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from florence_ops.artifacts import move_directory, write_text_atomic
from florence_ops.vision.cache import (
    CHUNK_BYTES,
    FEATURES,
    INDEX,
    VERIFY_THREADS,
    ChunkedDigest,
    VisionFeatureCache,
    chunk_digests,
)

log = logging.getLogger(__name__)


@torch.no_grad()
def build_cache(
    root: Path, key: str, image_ids: list[str], batches: Iterable[tuple[list[str], torch.Tensor]],
    encode: Callable[[torch.Tensor], torch.Tensor], warm_up: Callable[[], object] | None = None,
) -> VisionFeatureCache:  # fmt: skip
    """Compute and write the cache for `key` under `root`; return it opened.

    `batches` yields (image ids, loaded pages) in the order of `image_ids` (DataLoader workers decode the pages);
    `encode` runs the tower on the device and returns bf16 features still on the device (see `encode_pages`); hashing
    threads take each complete chunk as it is written.
    """
    tmp = new_build_folder(root, key, f"tmp-{os.getpid()}")
    try:
        with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="cache-sha256") as hashing:
            writer = FeatureWriter(tmp / FEATURES, len(image_ids), ChunkedDigest(hashing))
            start = time.perf_counter()
            rates = encode_pages(writer, image_ids, batches, encode, warm_up)
            looped = time.perf_counter()
            meta = writer.close()
    except BaseException:  # the published cache stays as it was, with nothing half-written beside it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_cache(tmp, root, key, image_ids, meta, (start, looped, rates))


def new_build_folder(root: Path, key: str, name: str) -> Path:
    """An empty folder `root/.key.name` to build the cache for `key` in, leftovers of killed builds removed."""
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(f".{key}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = root / f".{key}.{name}"
    tmp.mkdir(parents=True)
    return tmp


def encode_pages(
    writer: FeatureWriter, image_ids: list[str], batches: Iterable[tuple[list[str], torch.Tensor]],
    encode: Callable[[torch.Tensor], torch.Tensor], warm_up: Callable[[], object] | None = None,
) -> str:  # fmt: skip
    """Encode the pages of `batches` (which must come in the order of `image_ids`) and give `writer` the features;
    returns the rates for the log.

    The device computes batch k while batch k-1's features come back to the host on a CUDA stream of their own and a
    writer thread writes them. `warm_up` (a compiling tower's first call) runs once the workers have started on the
    first batches, so that both happen at once; its time counts as the first batch's.
    """
    done, start, first_batch = 0, time.perf_counter(), None
    waited = {"pages": 0.0, "writer": 0.0}  # steady-state seconds the device loop spent waiting on either side
    downloads = None  # the CUDA stream that brings features back, made with the first batch's device
    busy = []  # CUDA events around each later batch's encoding: the device's own time, which waiting overlaps
    with ThreadPoolExecutor(1) as pool:
        batches = iter(batches)  # a DataLoader's workers start decoding here
        if warm_up is not None:
            warm_up()
        pending, pages_ready = None, time.perf_counter()
        for ids, pages in batches:
            if first_batch is not None:
                waited["pages"] += time.perf_counter() - pages_ready
            if ids != image_ids[done : done + len(ids)]:
                raise RuntimeError("vision cache pages arrived out of order")
            done += len(ids)
            timed = downloads is not None  # a CUDA build past its first batch
            if timed:
                busy.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                busy[-1][0].record()
            features = encode(pages).to(torch.bfloat16)
            if timed:
                busy[-1][1].record()
            host = torch.empty(features.shape, dtype=torch.bfloat16, pin_memory=features.is_cuda)
            ready = None
            if features.is_cuda:
                downloads = downloads or torch.cuda.Stream(features.device)
                downloads.wait_stream(torch.cuda.current_stream(features.device))
                with torch.cuda.stream(downloads):
                    host.copy_(features, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()
                features.record_stream(downloads)  # its memory is reused only once the copy has read it
            else:
                host.copy_(features)
            if pending is not None:
                before = time.perf_counter()
                pending.result()
                waited["writer"] += time.perf_counter() - before
            pending = pool.submit(writer.write, host, ready)
            if first_batch is None:  # the first call compiles and warms up: timed apart from the steady rate
                pending.result()
                first_batch = (time.perf_counter() - start, len(ids))
            pages_ready = time.perf_counter()
        if pending is not None:
            pending.result()
    if done != len(image_ids):
        raise RuntimeError(f"vision cache got {done} of {len(image_ids)} pages")
    looped = time.perf_counter() - start
    warm_seconds, warm_pages = first_batch or (0.0, 0)
    rates = (f"first batch of {warm_pages}, compile and warm-up: {warm_seconds:.1f} s; then "
             f"{(done - warm_pages) / max(looped - warm_seconds, 1e-9):.1f} pages/s, {waited['pages']:.1f} s of it "
             f"waiting for pages and {waited['writer']:.1f} s for the writer")  # fmt: skip
    if busy:
        rates += f", the device busy {sum(a.elapsed_time(b) for a, b in busy) / 1000:.1f} s of it"
    log.info("vision pages encoded: %d in %.1f s (%s)", done, looped, rates)
    return rates


def publish_cache(
    tmp: Path, root: Path, key: str, image_ids: list[str], meta: dict, timing: tuple[float, float, str]
) -> VisionFeatureCache:
    """Write the index of the features built in `tmp` durably and rename `tmp` into place as the cache for `key`
    (caches of other keys removed); return it opened. `timing` (for the log): when the build began, when its pages
    were encoded, and how (rates)."""
    write_text_atomic(tmp / INDEX, json.dumps({"ids": image_ids, **meta}))
    _drop_stale(root, keep=key)
    folder = root / key
    move_directory(tmp, folder)
    start, looped, rates = timing
    end = time.perf_counter()
    log.info("vision cache built: %d images in %.1f s (%s; closing %.1f s) -> %s", len(image_ids), end - start, rates,
             end - looped, folder)  # fmt: skip
    return VisionFeatureCache(folder)


class FeatureWriter:
    """Writes bf16 feature rows to an .npy file of `rows` rows in order, from row `first` on, hashing them as they go
    when given a `digest`. Writers of disjoint row ranges may fill one file together (the first writes the header)."""

    def __init__(self, path: Path, rows: int, digest: ChunkedDigest | None, first: int = 0):
        self.path, self.rows, self.digest, self.first = path, rows, digest, first
        self.stream = None
        self.shape: tuple[int, ...] | None = None

    def write(self, host: torch.Tensor, ready) -> None:
        """Append `host` (bf16 rows) once the copy that fills it (`ready`, a CUDA event or None) has finished."""
        if ready is not None:
            ready.synchronize()
        if self.stream is None:
            self._open(host.shape[1:])
        data = memoryview(host.view(torch.uint16).numpy()).cast("B")
        self.stream.write(data)
        if self.digest is not None:
            self.digest.update(data)

    def _open(self, row_shape: tuple[int, ...]) -> None:
        self.shape = (self.rows, *row_shape)
        header = _npy_header(self.shape)
        self.offset = len(header)
        # opened without truncating: other writers may be filling other rows of the same file
        self.stream = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644), "wb")
        if self.first == 0:
            self.stream.write(header)
        else:
            self.stream.seek(self.offset + self.first * int(np.prod(row_shape)) * 2)

    def close(self, rows: int | None = None) -> dict:
        """Close the file (not fsynced: see the module's docstring); the index fields that describe it (the chunk
        digests when hashed here). `rows`, when fewer than the writer was opened for, is how many were written: the
        header is rewritten to say so, its length unchanged."""
        if self.stream is None:
            raise RuntimeError("no vision features were written")
        if rows is not None and rows != self.rows:
            self.shape = (rows, *self.shape[1:])
            self.stream.seek(0)
            self.stream.write(_npy_header(self.shape, self.offset))
        self.stream.close()
        meta = {"shape": list(self.shape), "dtype": "bfloat16", "data_offset": self.offset, "chunk_bytes": CHUNK_BYTES}
        return {**meta, "chunk_sha256": self.digest.finish()} if self.digest is not None else meta


def _npy_header(shape: tuple[int, ...], length: int | None = None) -> bytes:
    """The .npy header (format 1.0) of a uint16 array of `shape`, padded with spaces to `length` bytes if given."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<u2", "fortran_order": False, "shape": shape})
    text = header.getvalue()
    if length is None:
        return text
    if len(text) > length:
        raise ValueError(f"a .npy header for {shape} needs {len(text)} bytes, more than {length}")
    fields = text[10:].rstrip(b" \n")  # after the magic, version and length (10 bytes)
    return text[:8] + (length - 10).to_bytes(2, "little") + fields.ljust(length - 11) + b"\n"


def _drop_stale(root: Path, keep: str) -> None:
    """Remove caches of other keys: they belong to older weights or data and would only fill the disk."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name != keep and not entry.name.startswith("."):
            shutil.rmtree(entry, ignore_errors=True)


SHARDS = "tmp-shards"  # the build folder that a machine's processes fill together


def shard_rows(count: int, batch_size: int, index: int, shards: int) -> tuple[int, int]:
    """Rows [start, end) of `count` that shard `index` of `shards` encodes: a contiguous run of whole `batch_size`
    batches, so that every page is encoded in the same batch as in a one-process build (a kernel's rounding may
    depend on the batch it runs on) and the shards' bytes are that build's."""
    batches = -(-count // batch_size)
    first, last = -(-batches * index // shards), -(-batches * (index + 1) // shards)  # shard 0 is never empty
    return min(first * batch_size, count), min(last * batch_size, count)


@torch.no_grad()
def build_shard(
    folder: Path, image_ids: list[str], rows: tuple[int, int], batches: Iterable[tuple[list[str], torch.Tensor]],
    encode: Callable[[torch.Tensor], torch.Tensor], warm_up: Callable[[], object] | None = None,
) -> dict | None:  # fmt: skip
    """Encode the pages `image_ids[start:end]` (`rows`; `batches` yields them in order) into their rows of the
    features file in `folder` (made by `new_build_folder(root, key, SHARDS)`), which the other shards fill too;
    returns the file's index fields without digests (None for an empty shard)."""
    start, end = rows
    if start == end:
        return None
    writer = FeatureWriter(folder / FEATURES, len(image_ids), None, first=start)
    encode_pages(writer, image_ids[start:end], batches, encode, warm_up)
    return writer.close()


def finish_shards(
    folder: Path, root: Path, key: str, image_ids: list[str], meta: dict, start: float, shards: int
) -> VisionFeatureCache:
    """Hash the features file that all shards have written in `folder` (in parallel threads: one read, from the page
    cache as a rule) and publish it as the cache for `key`; `meta` as `build_shard` returned it for the first rows."""
    path, total = folder / FEATURES, int(np.prod(meta["shape"])) * 2
    size = path.stat().st_size
    if size != meta["data_offset"] + total:
        raise RuntimeError(f"vision cache shards wrote {size} bytes of {meta['data_offset'] + total}")
    looped = time.perf_counter()
    digests = chunk_digests(path, meta["data_offset"], total)
    timing = (start, looped, f"by {shards} processes")
    return publish_cache(folder, root, key, image_ids, {**meta, "chunk_sha256": digests}, timing)

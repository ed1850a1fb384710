"""Vision-feature cache: the frozen vision tower's output, computed once per image and reused every epoch.

DocVQA asks about four questions per page and the vision tower is about two thirds of an uncached training step, so
when the tower is frozen and images are not augmented its output is a pure function of (weights, preprocessing,
image). The cache is a bf16 array on disk (memory-mapped: it may exceed RAM) in a folder named by a key over exactly
those three inputs; a change to any of them selects a new folder, so a stale entry is never read.

A cache is never trusted blindly: `index.json` records its shape and a SHA-256 per 64 MiB chunk of the array, hashed
in parallel threads as the array is written (no extra pass). Every open checks the file's size and shape; `verify`
(when the train and evaluate stages open it) re-hashes the chunks in parallel threads. A damaged cache is deleted and
rebuilt, never read. The folder is built beside its place and renamed into it (`artifacts.publish_directory`), its
index written atomically and fsynced (`artifacts.write_text_atomic`) before; the features file is not fsynced: waiting
for the disk to take gigabytes would bound the build by its write speed, and a file torn by a crash fails the
checksums before anything reads it (a folder without its index does not open, and is rebuilt).
"""

from __future__ import annotations

import hashlib
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

from florence_ops.artifacts import publish_directory, write_text_atomic

log = logging.getLogger(__name__)

FEATURES, INDEX = "features.npy", "index.json"
CHUNK_BYTES = 64 << 20  # checksum granularity: one SHA-256 per 64 MiB of features
VERIFY_THREADS = min(16, os.cpu_count() or 1)


class CacheDamaged(Exception):
    """A cache folder whose files do not match its index (truncated, overwritten, or half written)."""


def cache_key(vision_tower: torch.nn.Module, image_processor_config: dict, image_ids: list[str], recipe: dict) -> str:
    """A digest of the tower's weights, the preprocessing config, the image contents (ids are content hashes) and how
    the features are computed (`recipe`, from `encoder.computed_with`: device type, precision, compilation), which
    moves them within bf16 rounding."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for name, tensor in sorted(vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(json.dumps(image_processor_config, sort_keys=True, default=str).encode())
    digest.update("\n".join(image_ids).encode())
    return digest.hexdigest()[:24]


class ChunkedDigest:
    """SHA-256 of each `CHUNK_BYTES` piece of a byte stream, fed in arbitrary pieces; each complete chunk is hashed in
    one of `pool`'s threads (hashlib releases the GIL), so hashing keeps pace with a GPU. The fed buffers are held
    until their chunk is hashed."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool, self.digests = pool, []
        self._pieces: list[memoryview] = []
        self._filled = 0

    def update(self, data: memoryview) -> None:
        """Feed the next bytes of the stream."""
        while len(data):
            take = min(len(data), CHUNK_BYTES - self._filled)
            self._pieces.append(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == CHUNK_BYTES:
                self._close_chunk()

    def finish(self) -> list[str]:
        """The chunk digests of the whole stream."""
        if self._filled:
            self._close_chunk()
        return [digest.result() for digest in self.digests]

    def _close_chunk(self) -> None:
        self.digests.append(self.pool.submit(_sha256, self._pieces))
        self._pieces, self._filled = [], 0


def _sha256(pieces: list[memoryview]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


class VisionFeatureCache:
    """Read access to a built cache: `features(image_ids)` returns a bf16 tensor (B, C, h, w).

    Raises `CacheDamaged` when the folder's files do not match its index (size, shape, dtype).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / INDEX).read_text())
            shape = tuple(self.meta["shape"])
            expected = self.meta["data_offset"] + int(np.prod(shape)) * 2
            size = (self.folder / FEATURES).stat().st_size
            if size != expected:
                raise CacheDamaged(f"{FEATURES} has {size} bytes, its index says {expected}")
            self.array = np.load(self.folder / FEATURES, mmap_mode="r")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CacheDamaged(f"{type(error).__name__}: {error}") from None
        if self.array.shape != shape or self.array.dtype != np.uint16 or self.array.offset != self.meta["data_offset"]:
            raise CacheDamaged(f"{FEATURES} holds {self.array.dtype}{self.array.shape}, its index says {shape}")
        self.row = {image_id: i for i, image_id in enumerate(self.meta["ids"])}

    def features(self, image_ids: list[str]) -> torch.Tensor:
        """Cached vision tower outputs of these images, in order."""
        rows = np.asarray([self.row[i] for i in image_ids])
        order = np.argsort(rows)  # sorted reads are sequential on disk
        block = np.empty((len(rows), *self.array.shape[1:]), dtype=np.uint16)
        block[order] = self.array[rows[order]]
        return torch.from_numpy(block).view(torch.bfloat16)

    def read_into(self, image_ids: list[str], out: torch.Tensor) -> torch.Tensor:
        """Cached features of these images, in order, copied once from the mapped file into the first rows of `out`
        (a bf16 CPU tensor, pinned or not); returns those rows."""
        rows = np.asarray([self.row[i] for i in image_ids], dtype=np.int64)
        filled = out[: len(rows)]
        np.take(self.array, rows, axis=0, out=filled.view(torch.int16).numpy().view(np.uint16))
        return filled

    def verify(self) -> None:
        """Re-hash the features chunk by chunk (in parallel threads) against the index; CacheDamaged if any differs."""
        expected = self.meta["chunk_sha256"]
        offset, total = self.meta["data_offset"], int(np.prod(self.meta["shape"])) * 2
        starts = range(0, total, CHUNK_BYTES)
        path = self.folder / FEATURES

        def chunk_digest(start: int) -> str:
            with open(path, "rb") as stream:
                stream.seek(offset + start)
                return hashlib.sha256(stream.read(min(CHUNK_BYTES, total - start))).hexdigest()

        with ThreadPoolExecutor(VERIFY_THREADS) as pool:
            found = list(pool.map(chunk_digest, starts))
        bad = [i for i, (a, b) in enumerate(zip(found, expected)) if a != b]
        if bad or len(found) != len(expected):
            raise CacheDamaged(f"checksum mismatch in {len(bad)} of {len(expected)} chunk(s) of {FEATURES}")


def open_cache(root: Path, key: str, verify: bool = False) -> VisionFeatureCache | None:
    """The cache for `key` under `root`, or None when there is none; a damaged one is deleted (one-line warning)."""
    folder = Path(root) / key
    if not folder.exists():
        return None
    try:
        cache = VisionFeatureCache(folder)
        if verify:
            cache.verify()
        return cache
    except CacheDamaged as error:
        log.warning("vision cache %s is damaged (%s): rebuilding it", folder, error)
        shutil.rmtree(folder, ignore_errors=True)
        return None


@torch.no_grad()
def build_cache(
    root: Path, key: str, image_ids: list[str], batches: Iterable[tuple[list[str], torch.Tensor]],
    encode: Callable[[torch.Tensor], torch.Tensor], warm_up: Callable[[], object] | None = None,
) -> VisionFeatureCache:  # fmt: skip
    """Compute and write the cache for `key` under `root`; return it opened.

    `batches` yields (image ids, loaded pages) in the order of `image_ids` (DataLoader workers decode the pages);
    `encode` runs the tower on the device and returns bf16 features still on the device. The device computes batch k
    while batch k-1's features come back to the host on a CUDA stream of their own and a writer thread writes them;
    hashing threads take each complete chunk. `warm_up` (a compiling tower's first call) runs once the workers have
    started on the first batches, so that both happen at once; its time counts as the first batch's. The folder is
    built beside its place and renamed into it with its index written (`artifacts.publish_directory`).
    """
    start = time.perf_counter()
    with publish_directory(Path(root) / key) as staging:
        meta, timing = _write_features(staging / FEATURES, image_ids, batches, encode, warm_up, start)
        write_text_atomic(staging / INDEX, json.dumps({"ids": image_ids, **meta}))
        _drop_stale(Path(root), keep=key)
    seconds = time.perf_counter() - start
    looped, (warm_seconds, warm_pages), waited = timing
    log.info("vision cache built: %d images in %.1f s (first batch of %d, compile and warm-up: %.1f s; then %.1f "
             "pages/s, %.1f s of it waiting for pages and %.1f s for the writer; closing %.1f s) -> %s",
             len(image_ids), seconds, warm_pages, warm_seconds,
             (len(image_ids) - warm_pages) / max(looped - warm_seconds, 1e-9), waited["pages"], waited["writer"],
             seconds - looped, Path(root) / key)  # fmt: skip
    return VisionFeatureCache(Path(root) / key)


def _write_features(
    path: Path, image_ids: list[str], batches: Iterable[tuple[list[str], torch.Tensor]],
    encode: Callable[[torch.Tensor], torch.Tensor], warm_up: Callable[[], object] | None, start: float,
) -> tuple[dict, tuple]:  # fmt: skip
    """Encode every batch and write the features to `path`; the index fields and the loop's timing."""
    hashing = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="cache-sha256")
    writer = _FeatureWriter(path, len(image_ids), ChunkedDigest(hashing))
    done, first_batch = 0, None
    waited = {"pages": 0.0, "writer": 0.0}  # steady-state seconds the device loop spent waiting on either side
    downloads = None  # the CUDA stream that brings features back, made with the first batch's device
    with hashing, ThreadPoolExecutor(1) as pool:
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
            features = encode(pages).to(torch.bfloat16)
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
        looped = time.perf_counter() - start
        if done != len(image_ids):
            raise RuntimeError(f"vision cache got {done} of {len(image_ids)} pages")
        return writer.close(), (looped, first_batch, waited)


class _FeatureWriter:
    """Writes bf16 feature rows to an .npy file in order, hashing them as they go."""

    def __init__(self, path: Path, rows: int, digest: ChunkedDigest):
        self.path, self.rows, self.digest = path, rows, digest
        self.stream = None
        self.shape: tuple[int, ...] | None = None

    def write(self, host: torch.Tensor, ready) -> None:
        """Append `host` (bf16 rows) once the copy that fills it (`ready`, a CUDA event or None) has finished."""
        if ready is not None:
            ready.synchronize()
        if self.stream is None:
            self.shape = (self.rows, *host.shape[1:])
            self.stream = open(self.path, "wb")  # noqa: SIM115 - open across batches, closed by close()
            header = {"descr": "<u2", "fortran_order": False, "shape": self.shape}
            np.lib.format.write_array_header_1_0(self.stream, header)
            self.offset = self.stream.tell()
        data = memoryview(host.view(torch.uint16).numpy()).cast("B")
        self.stream.write(data)
        self.digest.update(data)

    def close(self) -> dict:
        """Close the file (not fsynced: see the module's docstring); the index fields that describe it."""
        if self.stream is None:
            raise RuntimeError("no vision features were written")
        self.stream.close()
        return {"shape": list(self.shape), "dtype": "bfloat16", "data_offset": self.offset,
                "chunk_bytes": CHUNK_BYTES, "chunk_sha256": self.digest.finish()}  # fmt: skip


def _drop_stale(root: Path, keep: str) -> None:
    """Remove caches of other keys: they belong to older weights or data and would only fill the disk."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name != keep and not entry.name.startswith("."):
            shutil.rmtree(entry, ignore_errors=True)

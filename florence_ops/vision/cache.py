"""Vision-feature cache: the frozen vision tower's output, computed once per image and reused every epoch.

DocVQA asks about four questions per page and the vision tower is about two thirds of an uncached training step, so
when the tower is frozen and images are not augmented its output is a pure function of (weights, preprocessing,
image). The cache is a bf16 array on disk (memory-mapped: it may exceed RAM) in a folder named by a key over exactly
those three inputs; a change to any of them selects a new folder, so a stale entry is never read.

A cache is never trusted blindly: `index.json` records its shape and a SHA-256 per 64 MiB chunk of the array, hashed
in parallel threads as the array is written by one process (no extra pass), or read once more in parallel threads
when several processes wrote it (`cache_build.py`). Every open checks the file's size and shape; `verify`
(when the train and evaluate stages open it) re-hashes the chunks in parallel threads. A damaged cache is deleted and
rebuilt, never read. The index is written atomically and fsynced (`artifacts.write_text_atomic`) before the build
folder is renamed into place (`artifacts.move_directory`); the features file is not fsynced: waiting for the disk to
take gigabytes would bound the build by its write speed, and a file torn by a crash fails the checksums before
anything reads it (a folder without its index does not open, and is rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

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
        total = int(np.prod(self.meta["shape"])) * 2
        found = chunk_digests(self.folder / FEATURES, self.meta["data_offset"], total)
        bad = [i for i, (a, b) in enumerate(zip(found, expected)) if a != b]
        if bad or len(found) != len(expected):
            raise CacheDamaged(f"checksum mismatch in {len(bad)} of {len(expected)} chunk(s) of {FEATURES}")


def chunk_digests(path: Path, offset: int, total: int) -> list[str]:
    """SHA-256 of each `CHUNK_BYTES` piece of the `total` bytes of `path` from `offset`, read in parallel threads."""

    def chunk_digest(start: int) -> str:
        with open(path, "rb") as stream:
            stream.seek(offset + start)
            return hashlib.sha256(stream.read(min(CHUNK_BYTES, total - start))).hexdigest()

    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        return list(pool.map(chunk_digest, range(0, total, CHUNK_BYTES)))


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

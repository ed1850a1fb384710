"""Pages from the server's HTTP processes to its model workers, through shared memory.

A page at the model's input size is 1.7 MB of raw pixels (768x768 RGB). LitServe's request queue is a
multiprocessing manager queue: every item is pickled into the manager process and out again, one process for all
HTTP processes and workers, which at a hundred pages a second is the server's bound. So each page is written to a
file in a private directory on /dev/shm (memory, not disk) and only its path is queued. The HTTP process that wrote
a page removes it once its request is answered, has failed or was abandoned; the directory goes when the server
stops. Where /dev/shm is missing, unwritable or full (a container's default is 64 MB: `docker run --shm-size`), a
page travels in the queue itself, as before, and the server says so once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from florence_ops.processes import process_alive

log = logging.getLogger(__name__)
SHARED_MEMORY = Path("/dev/shm")
PREFIX = "florence-ops-pages-"


class PageHandoff:
    """A directory that pages cross through: `put` and `discard` in the HTTP process, `read_into` in the worker,
    `close` when the server stops."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._warned = False

    @classmethod
    def create(cls) -> PageHandoff:
        """A new private directory (mode 0700) on /dev/shm, or in the temp folder where there is no /dev/shm."""
        base = SHARED_MEMORY if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK) else None
        return cls(Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)))

    @staticmethod
    def remove_stale() -> None:
        """Remove the directories of servers that were killed before they could remove their own."""
        base = SHARED_MEMORY if SHARED_MEMORY.is_dir() else Path(tempfile.gettempdir())
        for folder in base.glob(f"{PREFIX}*-*"):
            pid = folder.name.removeprefix(PREFIX).split("-", 1)[0]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)

    def put(self, pixels: bytes) -> str | bytes:
        """What to queue for `pixels`: the path of the file they were written to, or the pixels themselves when
        they could not be written."""
        path = self.root / uuid.uuid4().hex
        try:
            path.write_bytes(pixels)
        except OSError as error:
            path.unlink(missing_ok=True)
            if not self._warned:
                self._warned = True
                log.warning("pages go through the request queue (slower): %s could not take one (%s)", self.root,
                            error)  # fmt: skip
            return pixels
        return str(path)

    @staticmethod
    def read_into(page: str | bytes, out) -> bool:
        """Copy the pixels `put` returned `page` for into the writable buffer `out` (of their size); False when the
        page was discarded first (its request abandoned)."""
        view = memoryview(out).cast("B")
        if isinstance(page, bytes):
            view[:] = page
            return True
        try:
            with open(page, "rb", buffering=0) as file:
                return file.readinto(view) == len(view)
        except FileNotFoundError:
            return False

    @staticmethod
    def discard(page: str | bytes) -> None:
        """Remove the file of `page`, if it has one."""
        if isinstance(page, str):
            Path(page).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the directory and any pages still in it."""
        shutil.rmtree(self.root, ignore_errors=True)

    def __getstate__(self) -> dict:
        return {"root": self.root, "_warned": False}

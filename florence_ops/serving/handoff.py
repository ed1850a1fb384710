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

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from florence_ops.processes import process_alive

log = logging.getLogger(__name__)
SHARED_MEMORY = Path("/dev/shm")
PREFIX = "florence-ops-pages-"
CLAIM_POLL_S = 0.002  # how often a request checks whether the page it waits for is ready
STALE_CLAIM_S = 10.0  # a claim this old belongs to a request whose process died: it is broken and the page prepared


class PageHandoff:
    """A directory that pages cross through: `share` (or `put`) and `discard` in the HTTP process, `read_into` in the
    worker, `close` when the server stops."""

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

    def put(self, pixels: bytes, key: str | None = None) -> str | bytes:
        """What to queue for `pixels`: the path of the file they were written to (named after page `key` when
        given), or the pixels themselves when they could not be written."""
        path = self.root / (f"{key}.{uuid.uuid4().hex}" if key else uuid.uuid4().hex)
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

    def share(self, key: str, prepare: Callable[[], bytes]) -> str | bytes:
        """What to queue for the page `key` (its content id and size): this request's link to the file of its pixels,
        made by `prepare()` in the first request about the page and shared by the requests about it meanwhile; or
        the pixels themselves where shared memory cannot take them. Raises what `prepare` raises."""
        claim = self.root / f"{key}.claim"
        while True:
            link = self._link(key)
            if link is not None:
                return link
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                self._wait_for(claim)
                continue
            except OSError:  # shared memory unwritable: the pixels go through the queue
                return self.put(prepare())
            try:
                return self._publish(key, prepare())
            finally:
                claim.unlink(missing_ok=True)

    def _link(self, key: str) -> str | None:
        """A new link of this request's own to the published page `key`, or None when it is not published."""
        link = self.root / f"{key}.{uuid.uuid4().hex}"
        try:
            os.link(self.root / key, link)
        except OSError:
            return None
        return str(link)

    def _publish(self, key: str, pixels: bytes) -> str | bytes:
        """Write `pixels` as page `key` (whole before the name appears) and return this request's link to it."""
        page = self.put(pixels, key)
        if isinstance(page, str):
            with contextlib.suppress(OSError):  # unshared then, but still this request's page
                os.link(page, self.root / key)
        return page

    @staticmethod
    def _wait_for(claim: Path) -> None:
        """Wait while another request prepares the claimed page; break a claim left by a process that died."""
        while True:
            try:
                age = time.time() - claim.stat().st_mtime
            except FileNotFoundError:
                return  # published, or its preparation failed: the caller looks again
            if age > STALE_CLAIM_S:
                claim.unlink(missing_ok=True)
                return
            time.sleep(CLAIM_POLL_S)

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
        """Remove this request's link to `page`, if it has one, and the shared page once no request holds it."""
        if not isinstance(page, str):
            return
        link = Path(page)
        link.unlink(missing_ok=True)
        shared = link.with_name(link.name.split(".", 1)[0])
        if shared != link:
            with contextlib.suppress(FileNotFoundError):
                if shared.stat().st_nlink == 1:  # only its own name is left
                    shared.unlink()

    def close(self) -> None:
        """Remove the directory and any pages still in it."""
        shutil.rmtree(self.root, ignore_errors=True)

    def __getstate__(self) -> dict:
        return {"root": self.root, "_warned": False}

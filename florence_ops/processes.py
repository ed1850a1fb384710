"""Child processes that do not outlive their parent, and whether a process is alive. Linux-specific parts do nothing
elsewhere (there, a killed parent may leave its children running).

The kernel sends a child its parent-death signal (PR_SET_PDEATHSIG) when the thread that started it ends, so start
such children from a thread that lives as long as the parent does (the main thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Have the kernel send this process `sig` when its parent dies; exit at once if `parent_pid` has died already.
    Nothing happens when this process is `parent_pid` itself (code meant for a child, run in the parent)."""
    prctl = _prctl()
    if os.getpid() == parent_pid or prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect: no signal will come
        os._exit(1)


def dies_with_this_process(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A `subprocess.Popen` `preexec_fn` that makes the child get `sig` when this process dies; None off Linux."""
    prctl, parent = _prctl(), os.getpid()
    if prctl is None:
        return None

    def set_death_signal() -> None:  # runs in the child, between fork and exec: prctl was looked up before
        if prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os._exit(1)

    return set_death_signal


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


M_MMAP_THRESHOLD = -3  # <malloc.h>


def return_large_frees_to_the_system(threshold_bytes: int = 1 << 20) -> None:
    """Have glibc's malloc give every allocation over `threshold_bytes` its own mapping, unmapped when freed.

    By default glibc raises that threshold as large blocks are freed (up to 32 MiB), after which decoded images
    (16 MiB blocks in Pillow) come from per-thread heaps that keep their memory: a burst of large pages then leaves
    a process gigabytes larger for good. Inherited by the processes forked afterwards; nothing off glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold_bytes)

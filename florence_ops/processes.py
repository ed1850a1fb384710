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
import subprocess
import sys
import tempfile
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


# multiprocessing's local sockets are <temp dir>/pymp-XXXXXXXX/listener-XXXXXXXX, and an AF_UNIX path holds at most
# 107 bytes on Linux, 103 on macOS. Python 3.13's multiprocessing falls back to a short directory by itself.
SOCKET_PATH_MAX = 103
SOCKET_SUFFIX = len("/pymp-XXXXXXXX/listener-XXXXXXXX")
SHORT_TEMP_DIRS = ("/tmp", "/var/tmp", "/usr/tmp")


def temp_dir_for_sockets() -> str | None:
    """Make multiprocessing's sockets fit: when the temp directory (`$TMPDIR`) is too long to hold them, point TMPDIR
    (this process's, and so its children's) at the first writable one of /tmp, /var/tmp, /usr/tmp. Returns the
    directory it replaced, or None when the temp directory was short enough; raises OSError when no short one is
    writable."""
    current = tempfile.gettempdir()
    if len(current) + SOCKET_SUFFIX <= SOCKET_PATH_MAX:
        return None
    for candidate in SHORT_TEMP_DIRS:
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            os.environ["TMPDIR"] = tempfile.tempdir = candidate
            return current
    limit = SOCKET_PATH_MAX - SOCKET_SUFFIX
    raise OSError(
        f"the temp directory {current} is {len(current)} characters, too long for local sockets (at most "
        f"{limit}), and none of {', '.join(SHORT_TEMP_DIRS)} is writable: set TMPDIR to a shorter one"
    )


def run_as_group(command: list[str]) -> int:
    """Run `command` in a process group of its own, led by this process, and stop the whole group (SIGTERM) when
    this process gets SIGTERM: also what its parent-death signal sends, when it was started with
    `dies_with_this_process`. Returns the command's exit status (128 + N after signal N).

    For commands that start their own children (`dvc repro` runs each stage through a shell): killing only the
    command would leave those running.
    """
    os.setpgid(0, 0)
    child = subprocess.Popen(command)

    def stop_group(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal below reaches this process too
        os.killpg(0, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_group)
    status = child.wait()
    return 128 - status if status < 0 else status


if __name__ == "__main__":  # python -m florence_ops.processes COMMAND ...: COMMAND as `run_as_group` runs it
    sys.exit(run_as_group(sys.argv[1:]))

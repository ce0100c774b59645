"""Process lifetime: who owns a leftover file, whether that owner still runs, and children that die
with their parent.

Files and directories a process may leave behind when it is killed (atomic-write temp files, a
trial's run directory) carry an owner tag, ``<pid>@<host>``, in their names. A later process removes
them only when :func:`owner_alive` says the owner is gone: a live process's files are never touched,
nor those of a process on another host (its pid says nothing here).

:func:`die_with_parent` is a ``preexec_fn`` for :class:`subprocess.Popen`: on Linux the child gets
``PR_SET_PDEATHSIG``, so the kernel kills it the moment the thread that started it dies (a
``kill -9`` of the parent included).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import sys
from typing import Callable, Optional

_PR_SET_PDEATHSIG = 1


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname() or "localhost")[:64]


HOST = _host()
_TAG = re.compile(r"(\d+)@([A-Za-z0-9_]+)")


def owner_tag(pid: Optional[int] = None) -> str:
    """``<pid>@<host>`` for this process (or ``pid`` on this host)."""
    return f"{os.getpid() if pid is None else pid}@{HOST}"


def parse_owner_tag(text: str) -> Optional[tuple[int, str]]:
    m = _TAG.fullmatch(text)
    return (int(m.group(1)), m.group(2)) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists here and is not a zombie (dead, not yet reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:][:1] != b"Z"
    except (OSError, ValueError):
        return True


def owner_alive(tag: str) -> bool:
    """False only for an owner on this host whose pid is gone; unknown tags and other hosts count
    as alive (nothing of theirs may be removed)."""
    parsed = parse_owner_tag(tag)
    if parsed is None:
        return True
    pid, host = parsed
    return host != HOST or pid_alive(pid)


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return fn


# Resolved once, in the parent: a preexec_fn runs between fork and exec, where loading a library
# could deadlock on a lock another thread of the parent held at the fork.
_prctl = _load_prctl()


def parent_death_signal_available() -> bool:
    return _prctl is not None


def set_parent_death_signal(sig: int, parent_pid: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when the thread that created it dies. If the
    parent (``parent_pid``) died before the request took effect, deliver ``sig`` now. Returns False
    where prctl is unavailable or refuses."""
    if _prctl is None or _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
    return True


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the calling thread of this process dies.

    The death signal follows the *thread* that forks, so call Popen from a thread that outlives
    the child (the tuner starts and waits for its children on one thread)."""
    parent = os.getpid()

    def preexec() -> None:
        set_parent_death_signal(sig, parent)

    return preexec


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that one cleanup path serves both."""
    signal_name = "SIGTERM"


def interrupt_name(exc: BaseException) -> str:
    """"SIGTERM" for :class:`Terminated`, "SIGINT" for any other KeyboardInterrupt."""
    return getattr(exc, "signal_name", "SIGINT")


def interrupt_exit_code(exc: BaseException) -> int:
    """128 + the signal number, as a shell reports a process that the signal ended."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def sigterm_raises_terminated():
    """Within the block SIGTERM raises :class:`Terminated` in the main thread."""
    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

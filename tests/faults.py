"""Faults injected into the GRPO trainer (``GRPOTrainer(..., faults=...)``): out-of-memory errors on
CPU, raised where CUDA would raise them, so the recovery paths run in the CPU suite; signals sent to
the trainer's own process at a chosen phase (SIGKILL for crashes, SIGTERM / SIGINT for stop
requests); a file-size limit that makes the next write fail; and a child process that runs the CLI
with one of these hooks installed."""

from __future__ import annotations

import resource
import signal
import sys
import textwrap
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent


def oom_in(phase: str, at_step: int = 1):
    """An out-of-memory at the start of ``phase`` ("generate" or "train") of step ``at_step``."""
    def fault(where: str, step: int, rows):
        if where == phase and step == at_step:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 1.50 GiB (simulated in {phase})")
    return fault


def oom_over_rows(limit: int):
    """An out-of-memory for any training-side forward over more than ``limit`` sequences."""
    def fault(where: str, step: int, rows):
        if where == "forward" and rows > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (simulated: {rows} rows > "
                                         f"{limit})")
    return fault


def _at(phase: str, at_step: int, nth: int, action):
    """Call ``action()`` at the ``nth`` time ``phase`` is reached in step ``at_step``."""
    seen = [0]

    def fault(where: str, step: int, rows):
        if where == phase and step == at_step:
            seen[0] += 1
            if seen[0] == nth:
                action()
    return fault


def signal_at(phase: str, at_step: int, sig: int, nth: int = 1, times: int = 1):
    """Send ``sig`` to this process ``times`` times at the ``nth`` ``phase`` of step ``at_step``
    ("generate", "train", "forward", or "checkpoint:<stage>" of the checkpoint of that step)."""
    def send():
        for i in range(times):
            # raise_signal: delivered to this (the main) thread at once. os.kill may land on another
            # thread, late, and two late deliveries of one signal coalesce into one Python handler call.
            signal.raise_signal(sig)
            if i + 1 < times:
                time.sleep(0.01)  # the handler runs (on the sleep's EINTR) before the next one is sent
    return _at(phase, at_step, nth, send)


def kill_at(phase: str, at_step: int, nth: int = 1):
    """SIGKILL this process there (see :func:`signal_at`): the crash of a kill -9."""
    return signal_at(phase, at_step, signal.SIGKILL, nth)


def file_size_limit_at(phase: str, at_step: int, nbytes: int):
    """Lower this process's RLIMIT_FSIZE to ``nbytes`` there: a later write past it fails (EFBIG;
    Python ignores SIGXFSZ)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return _at(phase, at_step, 1, limit)


def pause_at(phase: str, at_step: int, marker: str, seconds: float = 2.0):
    """Create the file ``marker`` there, then sleep ``seconds``: a window in which a test sends a
    signal from outside while the step is known to be running."""
    def pause():
        Path(marker).touch()
        time.sleep(seconds)
    return _at(phase, at_step, 1, pause)


# The CLI in a child process whose trainers get the fault hook ``{fault}`` (an expression over this module).
CLI_CHILD = textwrap.dedent("""
    import functools, sys
    sys.path.insert(0, {tests!r})
    import faults
    from compilepass.cli import main
    from compilepass.standby.grpo.trainer import GRPOTrainer
    GRPOTrainer.__init__ = functools.partialmethod(GRPOTrainer.__init__, faults={fault})
    sys.exit(main(sys.argv[1:]))
""")


def cli_with_fault(fault: str) -> list[str]:
    """The argv prefix of ``compilepass`` with the fault hook ``fault``, e.g. ``'faults.oom_in("generate")'``."""
    return [sys.executable, "-c", CLI_CHILD.format(tests=str(TESTS), fault=fault)]

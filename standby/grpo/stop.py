"""Stop requests: SIGTERM and SIGINT (Ctrl-C) during a GRPO run become a flag that the loop reads at
safe points, so the run saves its state and ends instead of dying mid-step.

:class:`StopRequest` is a context manager. While it is active in the main thread, the first SIGTERM
or SIGINT only records the signal (``requested``); a second one restores the handlers that were
there before and delivers the signal to them again (Ctrl-C twice stops at once: the atomic saves
leave the previous checkpoint intact). Outside the main thread it does nothing (Python runs signal
handlers there only).

:class:`TrainingInterrupted` is what the loop raises once the state is saved. It derives from
``KeyboardInterrupt``, like the exception a plain Ctrl-C raises, so that ``except Exception`` in
user code does not swallow a stop request; ``exit_code`` is 128 + the signal number (143 for
SIGTERM, 130 for SIGINT), the status a shell reports for a process ended by that signal.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

__all__ = ["StopRequest", "TrainingInterrupted", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal. ``step``: the last completed step whose state is saved in
    ``checkpoint`` (None: the signal came before the state could be saved)."""

    def __init__(self, signum: int, step: Optional[int] = None, checkpoint: Optional[Path] = None):
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint
        where = (f"state as of step {step} saved in {checkpoint}" if checkpoint is not None
                 else "nothing new was saved")
        super().__init__(f"{self.signal_name} received: {where}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """``with StopRequest() as stop: ... if stop.requested: ...`` (see the module docstring)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.requested: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signum
            return
        self._restore()
        signal.raise_signal(signum)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler installed outside Python
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

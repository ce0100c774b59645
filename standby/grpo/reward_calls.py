"""How one reward function is called: with keywords, as TRL calls it, and, when async, on an event loop.

The call is ``fn(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=...,
log_extra=..., log_metric=...)`` (every list aligned with the completions). A function that takes
``**kwargs`` gets every keyword; one that does not gets only the keywords it names (so
``def f(completions, answer)`` works too). One of the previous convention,
``fn(prompts, completions, answers, **meta)``, still works: a function with a parameter named
``answers`` gets the ``answer`` column under that name (when the dataset has no ``answers``
column of its own).

A function whose call returns an awaitable (``async def``, or a callable object with an
``async def __call__``) is awaited on :class:`AsyncRunner`'s event loop, one loop per
:class:`~compilepass.standby.grpo.rewards.RewardSet` in a daemon thread that lives as long as it,
so clients an async reward caches (an HTTP session) stay bound to one loop from step to step. All
the async rewards of a batch are awaited together with ``asyncio.gather`` after the sync ones
ran, as TRL does.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence

__all__ = ["RewardCall", "AsyncRunner", "LEGACY_ANSWERS"]

#: The previous convention's parameter, given the ``answer`` column.
LEGACY_ANSWERS = "answers"


class RewardCall:
    """One reward function and what its signature accepts."""

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name = name
        self.fn = fn
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: give it every keyword
            params = None
        if params is None:
            self.takes_all, self.accepted, self.required, self.positional_only = True, set(), set(), []
            return
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self.takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
        self.accepted = {p.name for p in named}
        self.required = {p.name for p in named if p.default is p.empty}
        self.positional_only = [p.name for p in params if p.kind == p.POSITIONAL_ONLY and p.default is p.empty]

    def missing(self, available: Sequence[str]) -> list[str]:
        """The required parameters no keyword of ``available`` fills (sorted), positional-only ones first."""
        have = set(available)
        if LEGACY_ANSWERS in self.required and LEGACY_ANSWERS not in have:
            have.add(LEGACY_ANSWERS)  # filled from the answer column (None where there is none)
        return self.positional_only + sorted(self.required - have)

    def keywords(self, full: Mapping[str, Any], n: int) -> dict[str, Any]:
        """The keywords for this function out of ``full`` (everything a TRL reward may be given)."""
        kw = dict(full)
        if LEGACY_ANSWERS in self.accepted and LEGACY_ANSWERS not in kw:
            kw[LEGACY_ANSWERS] = kw.get("answer", [None] * n)
        if not self.takes_all:
            kw = {k: v for k, v in kw.items() if k in self.accepted}
        return kw

    def __call__(self, full: Mapping[str, Any], n: int) -> Any:
        """The function's return value for the batch ``full`` (an awaitable for an async function)."""
        return self.fn(**self.keywords(full, n))


class AsyncRunner:
    """An event loop in a daemon thread, started at the first use: ``run(awaitables)`` awaits them
    together (``asyncio.gather``) and returns each result or the exception it raised."""

    def __init__(self):
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="compilepass-async-rewards", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def run(self, awaitables: Sequence[Awaitable[Any]]) -> list[Any]:
        if not awaitables:
            return []
        loop = self._start()

        async def gather():
            return await asyncio.gather(*awaitables, return_exceptions=True)

        return list(asyncio.run_coroutine_threadsafe(gather(), loop).result())

    def close(self) -> None:
        """Stop the loop and its thread (a later ``run`` starts new ones)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=5)
            if not loop.is_running():
                loop.close()

"""The automatic micro-batch: sequences per training forward, learned from out-of-memory errors.

``MicroBatchPlanner(fixed=0)`` runs the whole batch in one forward until a CUDA out-of-memory
teaches it a smaller size: the run is retried from scratch with half the sequences (down to one),
and the token count that fitted is kept (``fit_tokens``, checkpointed by the trainer) so later
steps start from it. A fixed size (``fixed > 0``) is used as given and never retried.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

log = logging.getLogger(__name__)


class MicroBatchPlanner:
    """``size(rows, width)`` and ``run(rows, width, what, fn)``; ``on_retry`` is called before each
    retry (the trainer zeroes the gradients and empties the allocator's cache there)."""

    def __init__(self, fixed: int = 0, fit_tokens: Optional[int] = None,
                 on_retry: Callable[[], None] = lambda: None):
        self.fixed = int(fixed)
        self.fit_tokens = fit_tokens  # tokens per forward known to fit (automatic mode)
        self.failed_size: Optional[int] = None  # sequences per forward of the last out-of-memory that was raised
        self._on_retry = on_retry

    def size(self, rows: int, width: int) -> int:
        """Sequences per forward for a batch of ``rows`` x ``width`` tokens."""
        if self.fixed:
            return min(rows, self.fixed)
        if self.fit_tokens is None:
            return rows
        return max(1, min(rows, self.fit_tokens // max(width, 1)))

    def run(self, rows: int, width: int, what: str, fn: Callable[[int], Any]) -> Any:
        """``fn(size)``; in automatic mode an out-of-memory halves the size and calls ``fn`` again."""
        size = self.size(rows, width)
        while True:
            try:
                return fn(size)
            except torch.OutOfMemoryError:
                if self.fixed or size == 1:
                    self.failed_size = size
                    raise
            # only after an out-of-memory: retried here, outside the handler, once the traceback's tensors are gone
            self._on_retry()
            new = (size + 1) // 2
            log.warning("%s: out of memory with %d sequences (%d tokens) per forward; retrying with %d "
                        "(automatic micro-batch; optim.micro_batch_size=N fixes it)", what, size, size * width, new)
            self.fit_tokens = new * width
            size = new

"""Faults injected into the GRPO trainer (``GRPOTrainer(..., faults=...)``): out-of-memory errors on
CPU, raised where CUDA would raise them, so the recovery paths run in the CPU suite."""

from __future__ import annotations

import torch


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

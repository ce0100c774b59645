"""Eval mode while generating (no dropout), every module's training flag restored afterwards."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode for ``model`` inside the block, each module's flag restored after (a no-op when
    nothing is in training mode)."""
    modes = [(m, m.training) for m in model.modules()]
    if not any(mode for _, mode in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode

"""Gradient (activation) checkpointing of every decoder layer."""

from __future__ import annotations

import warnings


def enable_checkpointing(causal_lm, reentrant: bool = False) -> None:
    """Gradient (activation) checkpointing of every decoder layer. Non-reentrant by default (the
    inputs need no ``requires_grad``); ``reentrant=True`` for activation offload, whose hooks see
    only what a reentrant checkpoint saves (see :mod:`compilepass.standby.training.offload`).
    ``enable_input_require_grads`` makes the reentrant form see a graph to differentiate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_*
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": bool(reentrant)})
        if hasattr(causal_lm, "enable_input_require_grads"):
            causal_lm.enable_input_require_grads()

"""Triton kernels that never materialize logits, each beside its PyTorch reference.

Entry points (dispatching per call, see :mod:`compilepass.kernels.dispatch`):

* :func:`selective_log_softmax` - per-token log-probs from hidden states and the lm_head weight;
* :func:`grpo_loss` - the GRPO policy loss (grpo / bnpo / dr_grpo / dapo / cispo; token- or
  sequence-level (GSPO) importance weights; an optional rollout IS weight) and its metrics;
* :func:`fused_head_grpo_loss` - that loss straight from hidden states and a trained lm_head, its
  gradients computed in the head's one pass (token-level weights only; no dispatch: PyTorch GEMMs).

Implementations: ``logprobs`` (reference, chunked PyTorch, Triton) and ``grpo_loss`` (reference,
Triton). Triton is imported only when a Triton path runs.
"""

from .dispatch import BACKENDS, ENV_VAR, backend_for, grpo_loss, selective_log_softmax
from .fused_head_loss import fused_head_grpo_loss
from .grpo_loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, grpo_loss_reference, grpo_loss_triton
from .logprobs import (
    selective_log_softmax_chunked,
    selective_log_softmax_reference,
    selective_log_softmax_triton,
)

__all__ = [
    "selective_log_softmax",
    "grpo_loss",
    "fused_head_grpo_loss",
    "backend_for",
    "ENV_VAR",
    "BACKENDS",
    "LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "selective_log_softmax_reference",
    "selective_log_softmax_chunked",
    "selective_log_softmax_triton",
    "grpo_loss_reference",
    "grpo_loss_triton",
]

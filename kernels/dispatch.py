"""Pick an implementation per call: Triton on CUDA, plain PyTorch elsewhere.

``COMPILEPASS_KERNELS`` (read at every call) forces a choice:

* ``triton``    - the Triton kernels (on CPU they run in the Triton interpreter: slow, for tests);
* ``reference`` - the materialized-logits reference and the plain-PyTorch GRPO loss;
* ``chunked``   - the pure-PyTorch token-chunked log-probs (and the plain-PyTorch GRPO loss);
* unset / ``auto`` - Triton when the tensors are on CUDA and Triton imports, else ``chunked``
  log-probs (the reference's logits would not fit in host memory for long sequences) and the
  plain-PyTorch GRPO loss.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from ._triton_support import triton_available
from .grpo_loss import Number, grpo_loss_reference, grpo_loss_triton
from .logprobs import (
    selective_log_softmax_chunked,
    selective_log_softmax_reference,
    selective_log_softmax_triton,
)

ENV_VAR = "COMPILEPASS_KERNELS"
BACKENDS = ("auto", "triton", "reference", "chunked")

__all__ = ["selective_log_softmax", "grpo_loss", "backend_for", "ENV_VAR", "BACKENDS"]


def _forced() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {BACKENDS}")
    return value


def backend_for(tensor: torch.Tensor) -> str:
    """The backend a call with ``tensor`` uses now: 'triton', 'reference' or 'chunked'."""
    forced = _forced()
    if forced == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but Triton cannot be imported")
        return "triton"
    if forced != "auto":
        return forced
    return "triton" if tensor.is_cuda and triton_available() else "chunked"


def selective_log_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
    *, return_entropy: bool = False,
):
    """float32 log-probs of ``token_ids`` under ``softmax(hidden @ weight.T / temperature)``.

    Shapes: hidden ``[..., H]``, weight ``[V, H]``, token_ids ``[...]`` -> ``[...]``. Gradients to
    hidden, and to weight only if ``weight.requires_grad``. ``return_entropy``: ``(logp, entropy)``,
    the entropy of that softmax per token (float32, no gradient) from the same logits, without a
    second pass over the vocabulary.
    """
    backend = backend_for(hidden)
    if backend == "triton":
        return selective_log_softmax_triton(hidden, weight, token_ids, temperature, return_entropy=return_entropy)
    if backend == "reference":
        return selective_log_softmax_reference(hidden, weight, token_ids, temperature, return_entropy=return_entropy)
    return selective_log_softmax_chunked(hidden, weight, token_ids, temperature, return_entropy=return_entropy)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    ref_logp: Optional[torch.Tensor],
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    loss_type: str = "grpo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[Number] = None,
    *,
    importance_sampling_level: str = "token",
    is_weight: Optional[torch.Tensor] = None,
    use_bias_correction_kl: bool = False,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO loss and metrics; see :mod:`compilepass.kernels.grpo_loss` for the definition."""
    fn = grpo_loss_triton if backend_for(logp) == "triton" else grpo_loss_reference
    return fn(logp, old_logp, ref_logp, advantages, completion_mask, epsilon_low, epsilon_high, beta, loss_type,
              max_completion_length, num_items_in_batch, importance_sampling_level=importance_sampling_level,
              is_weight=is_weight, use_bias_correction_kl=use_bias_correction_kl)

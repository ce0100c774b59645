"""The policy's entropy over completion tokens, for the ``entropy`` metric (TRL's name).

For heads that the log-prob kernels handle, the entropy per token comes out of the same kernel
pass as the log-probs (``selective_log_softmax(..., return_entropy=True)``: each logit tile's
own entropy, combined by the chain rule); :func:`entropy_from_logits` is for models whose logits
are materialized anyway. :class:`EntropyMeter` sums it over the completion mask across
micro-batches.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["EntropyMeter", "entropy_from_logits"]


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats, float32) of ``softmax(logits / temperature)`` over the last dimension."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class EntropyMeter:
    """Masked sum and count of per-token entropies; :meth:`mean` is their token mean."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.total: Optional[torch.Tensor] = None
        self.count = 0.0

    def add(self, entropy: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.to(torch.float32)
        s = (entropy.detach().float() * m).sum()
        self.total = s if self.total is None else self.total + s
        self.count += float(m.sum())

    def mean(self) -> float:
        return float(self.total) / self.count if self.total is not None and self.count > 0 else 0.0

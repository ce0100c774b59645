"""The policy's entropy over completion tokens, for the ``entropy`` metric (TRL's name).

``token_entropy(hidden, weight, temperature)`` is the entropy of ``softmax(hidden @ weight.T /
temperature)`` per token, computed without gradients in row chunks, so at most ``chunk_rows x
vocab`` logits exist at a time: one extra forward matmul of the output head over the completion
tokens (the loss kernels never form the distribution, so they cannot hand it over).
:class:`EntropyMeter` sums it over the completion mask across micro-batches.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["EntropyMeter", "entropy_from_logits", "token_entropy"]


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats, float32) of ``softmax(logits / temperature)`` over the last dimension."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def token_entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0,
                  chunk_rows: int = 256) -> torch.Tensor:
    """Entropy per token [...] of ``softmax(hidden [..., H] @ weight [V, H].T / temperature)``."""
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for r0 in range(0, h.shape[0], chunk_rows):
        out[r0:r0 + chunk_rows] = entropy_from_logits(h[r0:r0 + chunk_rows] @ weight.t(), temperature)
    return out.reshape(hidden.shape[:-1])


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

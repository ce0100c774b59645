"""Truncated importance sampling of the rollout engine's sampling distribution: the weight that
corrects the gap between the log-probs the engine sampled with and the trainer's own.

The definition is TRL's ``vllm_importance_sampling_correction`` (trl 1.16,
``GRPOTrainer._generate_and_score_completions``), for any engine that reports per-token sampling
log-probs::

    d[b, t] = (old[b, t] - sampling[b, t]) * mask[b, t]      # NaN (a token the engine could not score) -> 0
    token_*:     ratio[b, t] = exp(d[b, t])
    sequence_*:  ratio[b]    = exp(sum_t d[b, t])            # one weight for the whole row
    *_truncate:  ratio = clamp(ratio, clip_min, clip_max)    # either bound may be None
    *_mask:      ratio = 0 where ratio < clip_min or ratio > clip_max

``old`` is the trainer's log-probs before this batch's updates (``logp.detach()`` on-policy). The
weight is a constant multiplying the policy term of the loss (not the KL term).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["IS_MODES", "rollout_importance_weights"]

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def rollout_importance_weights(old_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                               clip_min: Optional[float] = None, clip_max: Optional[float] = 3.0,
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weights, metrics): weights [B, T] for ``token_*`` modes, [B, 1] for ``sequence_*`` ones
    (float32, no gradient). Metrics (0-dim float32, TRL's names), over the masked tokens (with
    sequence modes each token carries its row's weight): ``sampling/sampling_logp_difference/mean``
    and ``/max`` (of ``|old - sampling|``), ``sampling/importance_sampling_ratio/min``, ``/mean``
    and ``/max``; a max / min over no tokens is NaN, a mean 0."""
    if mode not in IS_MODES:
        raise ValueError(f"importance sampling mode must be one of {IS_MODES}, got {mode!r}")
    if old_logp.shape != sampling_logp.shape or old_logp.shape != mask.shape:
        raise ValueError(f"old_logp, sampling_logp and mask must have one shape, got {tuple(old_logp.shape)}, "
                         f"{tuple(sampling_logp.shape)}, {tuple(mask.shape)}")
    with torch.no_grad():
        m = mask.float()
        diff = torch.nan_to_num((old_logp.float() - sampling_logp.float()) * m, nan=0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        ratio = torch.exp(diff)
        if mode.endswith("truncate"):
            ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
        else:
            lo = -math.inf if clip_min is None else clip_min
            hi = math.inf if clip_max is None else clip_max
            ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
        return ratio, _metrics(old_logp, sampling_logp, m, ratio)


def _metrics(old_logp, sampling_logp, m, ratio) -> dict[str, torch.Tensor]:
    on = m != 0
    delta = (old_logp.float() - sampling_logp.float()).abs()
    scored = on & ~torch.isnan(delta)
    r = ratio.expand_as(m)[on]
    d = delta[scored]
    nan = torch.tensor(float("nan"), device=m.device)
    zero = torch.zeros((), device=m.device)
    return {
        "sampling/sampling_logp_difference/mean": d.mean() if d.numel() else zero,
        "sampling/sampling_logp_difference/max": d.max() if d.numel() else nan,
        "sampling/importance_sampling_ratio/min": r.min() if r.numel() else nan,
        "sampling/importance_sampling_ratio/mean": r.mean() if r.numel() else zero,
        "sampling/importance_sampling_ratio/max": r.max() if r.numel() else nan,
    }

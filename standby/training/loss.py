"""The GRPO step's arithmetic: group-relative advantages, and the loss of one micro-batch scaled so
that the micro-batches of a batch sum to the whole batch's loss and gradient."""

from __future__ import annotations

import math
from typing import Optional

import torch

from compilepass.kernels import grpo_loss
from compilepass.standby.training.importance import rollout_importance_weights


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> tuple[torch.Tensor, int]:
    """(advantages [N], number of groups whose rewards are all equal) for N = groups * group_size
    rewards laid out group by group. ``scale``: divide by the group's std (+1e-4). A NaN reward
    (no reward function scored that completion) is left out of its group's mean and std and gets
    an advantage of 0, as in TRL."""
    r = rewards.float().view(-1, group_size)
    if bool(torch.isnan(r).any()):
        return _nan_group_advantages(r, scale)
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = r - mean
    if scale:
        adv = adv / (std + 1e-4)
    zero = int(((r.max(1).values - r.min(1).values).abs() <= 1e-12).sum())
    return adv.reshape(-1), zero


def nan_group_std(r: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Each group's sample std over its non-NaN values, ``r`` [groups, G] (a group of one value: 0)."""
    count = (~torch.isnan(r)).sum(1, keepdim=True)
    mean = torch.nanmean(r, 1, keepdim=True)
    std = (torch.nansum((r - mean) ** 2, 1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    return std if keepdim else std.squeeze(1)


def _nan_group_advantages(r: torch.Tensor, scale: bool) -> tuple[torch.Tensor, int]:
    """group_advantages over the non-NaN rewards of each group [groups, G]; NaN rows get 0."""
    valid = ~torch.isnan(r)
    count = valid.sum(1, keepdim=True)
    mean = torch.nanmean(r, 1, keepdim=True)
    adv = r - mean
    if scale:
        adv = adv / (nan_group_std(r, keepdim=True) + 1e-4)
    spread = torch.where(valid, r, -math.inf).amax(1) - torch.where(valid, r, math.inf).amin(1)
    zero = int(((spread.abs() <= 1e-12) | (count.squeeze(1) <= 1)).sum())
    return torch.nan_to_num(adv, nan=0.0).reshape(-1), zero


def micro_batch_loss(logp: torch.Tensor, old: Optional[torch.Tensor], ref: Optional[torch.Tensor],
                     advantages: torch.Tensor, mask: torch.Tensor, n_items: torch.Tensor, sl: slice, *,
                     loss_type: str, beta: float, epsilon_low: float, epsilon_high: float,
                     max_completion_length: int, importance_sampling_level: str = "token",
                     use_bias_correction_kl: bool = False, sampling: Optional[torch.Tensor] = None,
                     is_mode: str = "sequence_mask", is_clip_min: Optional[float] = None,
                     is_clip_max: Optional[float] = 3.0) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of rows ``sl`` of the batch (``logp`` holds those rows; ``old`` / ``ref`` /
    ``advantages`` / ``mask`` / ``sampling`` the whole batch's), scaled so that the micro-batches'
    losses sum to the whole batch's (same value, same gradient, up to summation order): per-row
    means (grpo, dr_grpo) weigh by the rows' share, the batch token mean (bnpo) by the tokens'
    share; dapo and cispo already divide by the whole batch's token count (``n_items``). Under
    data parallelism ``n_items`` is the global token count / N (bnpo is scaled to it as well), so
    that the ranks' losses average to the global batch's.

    Sequence-level importance weights (``importance_sampling_level="sequence"``) and the rollout
    correction are per row (sequence modes) or per token, so splitting by rows keeps them exact.
    ``sampling``: the engine's per-token sampling log-probs; given, the policy term is weighted
    by :func:`~compilepass.standby.training.importance.rollout_importance_weights` of the old
    log-probs (``logp.detach()`` on-policy) against them (``is_mode``, ``is_clip_min``,
    ``is_clip_max``), and its metrics join the loss's."""
    m_mask = mask[sl]
    old_rows = old[sl] if old is not None else logp.detach()
    is_weight, is_metrics = None, {}
    if sampling is not None:
        is_weight, is_metrics = rollout_importance_weights(old_rows, sampling[sl], m_mask, is_mode,
                                                           is_clip_min, is_clip_max)
    loss, metrics = grpo_loss(logp, old_rows, ref[sl] if ref is not None else None, advantages[sl], m_mask,
                              epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
                              loss_type=loss_type, max_completion_length=max_completion_length,
                              num_items_in_batch=n_items, importance_sampling_level=importance_sampling_level,
                              is_weight=is_weight, use_bias_correction_kl=use_bias_correction_kl)
    metrics.update(is_metrics)
    rows, m_rows = mask.shape[0], m_mask.shape[0]
    if loss_type == "bnpo":  # also for the whole batch: n_items may be a global count (several ranks); else x1.0
        loss = loss * (m_mask.sum().clamp(min=1) / n_items.clamp(min=1))
    if m_rows == rows:
        return loss, metrics
    if loss_type in ("grpo", "dr_grpo"):
        loss = loss * (m_rows / rows)
    return loss, metrics


def combine_metrics(acc: dict, metrics: dict, frac: torch.Tensor) -> dict:
    """Add one micro-batch's ``metrics`` to the running ``acc`` (in place; returned): token means
    weighted by the micro-batch's token share ``frac``; keys ending ``/min`` / ``/max`` by
    min / max (NaN, a min or max over no tokens, is passed over)."""
    for k, v in metrics.items():
        v = v.detach()
        if k.endswith("/min") or k.endswith("/max"):
            pick = torch.fmin if k.endswith("/min") else torch.fmax
            acc[k] = v if k not in acc else pick(acc[k], v)
        else:
            acc[k] = acc.get(k, 0.0) + v * frac
    return acc

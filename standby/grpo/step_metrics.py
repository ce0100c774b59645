"""A step's reward and completion metrics under TRL's names (TRL 1.16's ``GRPOTrainer``).

``reward`` (mean over the batch), ``reward_std`` (the batch's standard deviation, unbiased, as
TRL's ``nanstd``), ``rewards/<name>/mean`` and ``rewards/<name>/std`` per reward function (its
unweighted values), ``frac_reward_zero_std`` (the fraction of groups whose rewards are all
equal: they carry no advantage), ``completions/mean_length`` / ``min_length`` / ``max_length``
(tokens, EOS included), ``completions/clipped_ratio`` (the fraction that reached
``max_completion_len`` without a stop) and ``completions/mean_terminated_length`` /
``min_terminated_length`` / ``max_terminated_length`` (over those that stopped; 0 when none did).
The loss side (``loss``, ``kl``, ``entropy``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean``, ``grad_norm``) comes from the training step; ``learning_rate`` from the
optimizer.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from compilepass.standby.training.loss import nan_group_std

__all__ = ["completion_metrics", "reward_metrics", "reward_moments"]


def _std(x: torch.Tensor) -> float:
    """Sample std over the non-NaN values (NaN: no reward function scored that completion), as
    TRL's nanstd."""
    x = x.float()
    x = x[~x.isnan()]
    return float(x.std()) if x.numel() > 1 else 0.0


def reward_metrics(total: torch.Tensor, parts: Mapping[str, torch.Tensor], group_size: int) -> dict[str, float]:
    """``total`` [N]: the weighted sum per completion, laid out group by group; ``parts``: each
    reward function's values [N] by its label."""
    out = {"reward": float(total.float().nanmean()), "reward_std": _std(total)}
    for name, values in parts.items():
        out[f"rewards/{name}/mean"] = float(values.float().nanmean())
        out[f"rewards/{name}/std"] = _std(values)
    grouped = total.float().view(-1, group_size)
    group_std = nan_group_std(grouped) if group_size > 1 else torch.zeros(grouped.shape[0])
    out["frac_reward_zero_std"] = float(torch.isclose(group_std, torch.zeros_like(group_std)).float().mean())
    return out


def reward_moments(total: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, list[float]]]:
    """What pools :func:`reward_metrics`' batch means and stds exactly over data-parallel ranks:
    ``{mean key: (std key, [count, sum, sum of squares])}`` over each tensor's non-NaN values."""

    def moments(x: torch.Tensor) -> list[float]:
        x = x.double()
        x = x[~x.isnan()]
        return [float(x.numel()), float(x.sum()), float((x * x).sum())]

    out = {"reward": ("reward_std", moments(total))}
    for name, values in parts.items():
        out[f"rewards/{name}/mean"] = (f"rewards/{name}/std", moments(values))
    return out


def completion_metrics(lengths: Sequence[int], truncated: Sequence[bool]) -> dict[str, float]:
    n = torch.tensor([float(x) for x in lengths])
    cut = torch.tensor(list(truncated), dtype=torch.bool)
    term = n[~cut] if bool((~cut).any()) else torch.zeros(1)
    return {
        "completions/mean_length": float(n.mean()),
        "completions/min_length": float(n.min()),
        "completions/max_length": float(n.max()),
        "completions/clipped_ratio": float(cut.float().mean()),
        "completions/mean_terminated_length": float(term.mean()),
        "completions/min_terminated_length": float(term.min()),
        "completions/max_terminated_length": float(term.max()),
    }

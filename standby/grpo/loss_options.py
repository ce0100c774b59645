"""The checks of the loss options taken from TRL (``loss.*`` keys), and TRL's names for them.

:data:`TRL_LOSS_NAMES` maps a ``trl.GRPOConfig`` field onto our ``loss`` key where the names
differ; the other loss fields (``loss_type``, ``beta``, ``num_iterations``, ``scale_rewards``,
``importance_sampling_level``, ``mask_truncated_completions``, ``use_bias_correction_kl``) are
named as in TRL. TRL's ``vllm_`` prefix is dropped: the correction applies to whichever engine
generated, ours or vLLM.
"""

from __future__ import annotations

import math
from typing import Callable

from compilepass.standby.training.importance import IS_MODES

__all__ = ["IS_MODES", "TRL_LOSS_NAMES", "check_loss_options", "loss_inputs"]

TRL_LOSS_NAMES = {
    "epsilon": "epsilon_low",
    "epsilon_high": "epsilon_high",
    "vllm_importance_sampling_correction": "importance_sampling_correction",
    "vllm_importance_sampling_mode": "importance_sampling_mode",
    "vllm_importance_sampling_clip_max": "importance_sampling_clip_max",
    "vllm_importance_sampling_clip_min": "importance_sampling_clip_min",
    "vllm_importance_sampling_cap": "importance_sampling_clip_max",  # deprecated in TRL for clip_max
}


def check_loss_options(loss, require: Callable[[bool, str, str], None]) -> None:
    """Range checks of a LossConfig's TRL options; ``require(ok, key, message)`` raises the
    config's one-line ConfigError."""
    if loss.loss_type == "cispo":
        require(loss.epsilon_high >= 1, "loss.epsilon_high",
                f"caps CISPO's importance weight (TRL's epsilon_max; 5.0 is recommended) and must be >= 1 with "
                f"loss_type cispo (got {loss.epsilon_high})")
    hi, lo = loss.importance_sampling_clip_max, loss.importance_sampling_clip_min
    require(hi is None or (math.isfinite(hi) and hi > 0), "loss.importance_sampling_clip_max",
            f"must be > 0 or null (got {hi})")
    require(lo is None or (math.isfinite(lo) and lo >= 0), "loss.importance_sampling_clip_min",
            f"must be >= 0 or null (got {lo})")
    require(lo is None or hi is None or lo < hi, "loss.importance_sampling_clip_min",
            f"must be < loss.importance_sampling_clip_max (got {lo} >= {hi})")
    if loss.importance_sampling_correction and loss.importance_sampling_mode.endswith("truncate"):
        require(lo is not None or hi is not None, "loss.importance_sampling_clip_max",
                f"and importance_sampling_clip_min are both null; {loss.importance_sampling_mode} needs a bound")


def loss_inputs(loss, out, mask, truncated):
    """What the loss needs from a step's rollout beyond the completions, per the ``loss`` options:
    ``(loss_mask, sampling_logprobs)``. ``loss_mask`` is ``mask`` with the ``truncated`` completions
    (bool [B], :func:`~compilepass.standby.training.truncation.truncated_completions`) zeroed when
    ``mask_truncated_completions``; ``sampling_logprobs`` the engine's when
    ``importance_sampling_correction`` (its ``logprobs`` if it reports no separate sampling ones),
    else None."""
    from compilepass.standby.training.truncation import mask_truncated

    loss_mask = mask_truncated(mask, truncated.to(mask.device)) if loss.mask_truncated_completions else mask
    sampling = None
    if loss.importance_sampling_correction:
        sampling = out.sampling_logprobs if out.sampling_logprobs is not None else out.logprobs
    return loss_mask, sampling

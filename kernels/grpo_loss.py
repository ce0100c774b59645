"""GRPO policy loss from per-token log-probs: a plain-PyTorch reference and a fused Triton version.

Both have one signature::

    grpo_loss(logp, old_logp, ref_logp, advantages, completion_mask,
              epsilon_low=0.2, epsilon_high=0.2, beta=0.0, loss_type="grpo",
              max_completion_length=None, num_items_in_batch=None) -> (loss, metrics)

Per token (``A`` = the sequence's advantage)::

    ratio    = exp(logp - old_logp)                 # old_logp None: on-policy, old = logp.detach()
    loss_tok = -min(ratio * A, clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
    loss_tok += beta * (exp(ref - logp) - (ref - logp) - 1)        # only if beta > 0 (k3 estimator)

Normalization of the masked token sum, by ``loss_type``:

* ``grpo``:    mean over sequences of (sequence's masked sum / its token count)
* ``bnpo``:    / total masked tokens in the batch
* ``dr_grpo``: / (B * max_completion_length), default max_completion_length = T
* ``dapo``:    / num_items_in_batch (the global token count across gradient-accumulation steps; pass
  the per-process count under data parallelism), default: masked tokens in this batch

Every denominator is clamped to >= 1, so fully masked rows or batches give 0, never NaN.

Metrics (no gradient, 0-dim float32 tensors, means over masked tokens):
``clip_ratio/low_mean`` (ratio < 1 - eps_low and A < 0), ``clip_ratio/high_mean`` (ratio > 1 + eps_high
and A > 0), ``clip_ratio/region_mean`` (either), and ``kl`` (mean k3) when beta > 0.

Gradients flow to ``logp`` only; ``old_logp``, ``ref_logp``, ``advantages`` and the mask are constants
(in the reference too: they are detached).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from ._triton_support import cdiv, is_interpreted, kernel_for

__all__ = ["grpo_loss_reference", "grpo_loss_triton", "LOSS_TYPES"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

Number = Union[int, float, torch.Tensor]


def _validate(logp, old_logp, ref_logp, advantages, completion_mask, epsilon_low, epsilon_high, beta, loss_type,
              max_completion_length):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("completion_mask", completion_mask)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have logp's shape {shape}, got {tuple(t.shape)}")
    if advantages.numel() != shape[0]:
        raise ValueError(f"advantages must have B={shape[0]} elements, got shape {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's per-token log-probs)")
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"epsilons must be >= 0, got {epsilon_low}, {epsilon_high}")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")


def _as_float_tensor(x: Number, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(x), dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def grpo_loss_reference(
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
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Plain PyTorch autograd GRPO loss (module docstring has the definition)."""
    _validate(logp, old_logp, ref_logp, advantages, completion_mask, epsilon_low, epsilon_high, beta, loss_type,
              max_completion_length)
    B, T = logp.shape
    logp = logp.float()
    mask = completion_mask.to(torch.float32)
    old = logp.detach() if old_logp is None else old_logp.detach().float()
    adv = advantages.detach().float().reshape(B, 1)
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta > 0:
        delta = ref_logp.detach().float() - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = T if max_completion_length is None else max_completion_length
        loss = masked.sum() / (B * length)
    else:  # dapo
        n = mask.sum() if num_items_in_batch is None else _as_float_tensor(num_items_in_batch, logp.device)
        loss = masked.sum() / n.clamp(min=1.0)
    with torch.no_grad():
        total = mask.sum().clamp(min=1.0)
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
        metrics = {
            "clip_ratio/low_mean": (low * mask).sum() / total,
            "clip_ratio/high_mean": (high * mask).sum() / total,
            "clip_ratio/region_mean": ((low + high) * mask).sum() / total,
        }
        if kl is not None:
            metrics["kl"] = (kl * mask).sum() / total
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------


def _row_weights(mask: torch.Tensor, loss_type: str, max_completion_length, num_items_in_batch) -> torch.Tensor:
    """Weight of each row's tokens in the loss: loss = sum_{b,t} w[b] * mask[b,t] * loss_tok[b,t]."""
    B, T = mask.shape
    if loss_type == "grpo":
        return 1.0 / (B * mask.sum(-1).clamp(min=1.0))
    if loss_type == "bnpo":
        return (1.0 / mask.sum().clamp(min=1.0)).expand(B).contiguous()
    if loss_type == "dr_grpo":
        length = T if max_completion_length is None else max_completion_length
        return torch.full((B,), 1.0 / (B * length), dtype=torch.float32, device=mask.device)
    n = mask.sum() if num_items_in_batch is None else _as_float_tensor(num_items_in_batch, mask.device)
    return (1.0 / n.clamp(min=1.0)).expand(B).contiguous()


class _GRPOLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, adv, mask, roww, eps_low, eps_high, beta, need_grad):
        B, T = logp.shape
        n = B * T
        kernel = kernel_for(_kernel_fn(), logp.device)
        interp = is_interpreted(kernel)
        block = 256 if interp else 1024
        progs = cdiv(n, block)
        part = torch.empty(progs, 4, dtype=torch.float32, device=logp.device)
        grad = torch.empty_like(logp) if need_grad else None
        kernel[(progs,)](
            logp, old if old is not None else logp, ref if ref is not None else logp, adv, mask, roww,
            grad if grad is not None else part, part,
            n, T, float(eps_low), float(eps_high), float(beta),
            HAS_OLD=old is not None, HAS_KL=beta > 0, NEED_GRAD=need_grad, BLOCK=block,
            **({} if interp else {"num_warps": 4}),
        )
        sums = part.sum(0)
        ctx.save_for_backward(grad)
        loss, low, high, kl = sums[0].clone(), sums[1].clone(), sums[2].clone(), sums[3].clone()
        ctx.mark_non_differentiable(low, high, kl)
        return loss, low, high, kl

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None, None, None, None, None


def _kernel_fn():
    from ._grpo_triton import grpo_token_kernel

    return grpo_token_kernel


def grpo_loss_triton(
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
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO loss as one fused Triton pass over [B, T] that also writes d loss / d logp.

    Same definition, signature and results as :func:`grpo_loss_reference`. Runs compiled on CUDA and
    in the Triton interpreter on CPU.
    """
    _validate(logp, old_logp, ref_logp, advantages, completion_mask, epsilon_low, epsilon_high, beta, loss_type,
              max_completion_length)
    B, T = logp.shape
    if B * T >= 2**31:
        raise ValueError(f"B*T = {B * T} tokens is more than this kernel indexes (2**31 - 1)")
    lp = logp.float().contiguous()
    mask = completion_mask.to(torch.float32).contiguous()
    old = None if old_logp is None else old_logp.detach().float().contiguous()
    ref = None if beta <= 0 else ref_logp.detach().float().contiguous()
    adv = advantages.detach().float().reshape(B).contiguous()
    roww = _row_weights(mask, loss_type, max_completion_length, num_items_in_batch).float().contiguous()
    total = mask.sum().clamp(min=1.0)
    if B * T == 0:
        zero = lp.sum() * 0
        metrics = {k: torch.zeros((), device=lp.device) for k in
                   ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")}
        if beta > 0:
            metrics["kl"] = torch.zeros((), device=lp.device)
        return zero, metrics
    need_grad = torch.is_grad_enabled() and lp.requires_grad  # not ctx.needs_input_grad: True under no_grad
    loss, low, high, kl = _GRPOLossTriton.apply(lp, old, ref, adv, mask, roww, epsilon_low, epsilon_high, beta,
                                                need_grad)
    metrics = {
        "clip_ratio/low_mean": low / total,
        "clip_ratio/high_mean": high / total,
        "clip_ratio/region_mean": (low + high) / total,
    }
    if beta > 0:
        metrics["kl"] = kl / total
    return loss, metrics

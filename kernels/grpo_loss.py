"""GRPO policy loss from per-token log-probs: a plain-PyTorch reference and a fused Triton version.

Both have one signature::

    grpo_loss(logp, old_logp, ref_logp, advantages, completion_mask,
              epsilon_low=0.2, epsilon_high=0.2, beta=0.0, loss_type="grpo",
              max_completion_length=None, num_items_in_batch=None, *,
              importance_sampling_level="token", is_weight=None,
              use_bias_correction_kl=False) -> (loss, metrics)

The importance weight (``old_logp`` None: on-policy, old = logp.detach(), weight 1 with the
weight's gradient)::

    token    (default):   logw[b, t] = logp[b, t] - old[b, t]
    sequence (GSPO):      logw[b]    = masked mean over t of (logp[b, t] - old[b, t])   # one per row
    coef = exp(logw)                                                   # broadcast to the row's tokens

Per token (``A`` = the sequence's advantage)::

    clipped losses:  loss_tok = -min(coef * A, clamp(coef, 1 - epsilon_low, 1 + epsilon_high) * A)
    cispo:           loss_tok = -detach(min(coef, epsilon_high)) * A * logp   # epsilon_high: a cap, not 1 + eps
    loss_tok *= is_weight                # optional constant weight ([B, T] or [B]): the rollout correction
    loss_tok += beta * kl                # only if beta > 0; kl = exp(ref - logp) - (ref - logp) - 1 (k3),
                                         # times coef when use_bias_correction_kl (TRL's option; not detached)

These are TRL's ``GRPOTrainer._compute_loss`` formulas (trl 1.16), including the order of the IS
weight and the KL term.

Normalization of the masked token sum, by ``loss_type``:

* ``grpo``:    mean over sequences of (sequence's masked sum / its token count)
* ``bnpo``:    / total masked tokens in the batch
* ``dr_grpo``: / (B * max_completion_length), default max_completion_length = T
* ``dapo``, ``cispo``: / num_items_in_batch (the global token count across gradient-accumulation steps;
  pass the per-process count under data parallelism), default: masked tokens in this batch

With sequence-level weights the policy term is the same for every token of a row, so ``bnpo`` /
``dr_grpo`` / ``dapo`` / ``cispo`` weigh each sequence by its length (as TRL does); ``grpo`` gives
GSPO's per-sequence objective. Every denominator is clamped to >= 1, so fully masked rows or
batches give 0, never NaN.

Metrics (no gradient, 0-dim float32 tensors, means over masked tokens; with sequence-level
weights a token counts as clipped when its sequence is): ``clip_ratio/low_mean`` (coef < 1 -
eps_low and A < 0), ``clip_ratio/high_mean`` (coef > 1 + eps_high and A > 0),
``clip_ratio/region_mean`` (either); for ``cispo`` instead ``cispo_clip_ratio`` (coef >
epsilon_high and A > 0); and ``kl`` (mean of the KL term as added, before beta) when beta > 0.

Gradients flow to ``logp`` only; ``old_logp``, ``ref_logp``, ``advantages``, ``is_weight`` and the
mask are constants (in the reference too: they are detached).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from ._triton_support import cdiv, is_interpreted, kernel_for

__all__ = ["grpo_loss_reference", "grpo_loss_triton", "LOSS_TYPES", "IMPORTANCE_SAMPLING_LEVELS"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
_CLIP_KEYS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")

Number = Union[int, float, torch.Tensor]


def _validate(logp, old_logp, ref_logp, advantages, completion_mask, epsilon_low, epsilon_high, beta, loss_type,
              max_completion_length, importance_sampling_level="token", is_weight=None):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("completion_mask", completion_mask)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have logp's shape {shape}, got {tuple(t.shape)}")
    if advantages.numel() != shape[0]:
        raise ValueError(f"advantages must have B={shape[0]} elements, got shape {tuple(advantages.shape)}")
    if is_weight is not None and tuple(is_weight.shape) not in (shape, (shape[0],), (shape[0], 1)):
        raise ValueError(f"is_weight must be [B, T], [B] or [B, 1] for logp {shape}, got {tuple(is_weight.shape)}")
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


def _weight_2d(is_weight: Optional[torch.Tensor], B: int, T: int) -> Optional[torch.Tensor]:
    """``is_weight`` as a detached float32 [B, T] or [B, 1] tensor."""
    if is_weight is None:
        return None
    w = is_weight.detach().float()
    return w if w.dim() == 2 and w.shape[1] == T else w.reshape(B, 1)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def token_terms(logp, log_w, adv, isw, ref, *, loss_type: str, epsilon_low: float, epsilon_high: float, beta: float,
                bias_kl: bool):
    """``(loss_tok, coef, kl)``: each token's loss term before normalization (the module docstring's
    formulas), its importance weight and its KL term (None unless beta > 0). Shared by the reference
    and :func:`~compilepass.kernels.fused_head_loss.fused_head_grpo_loss`."""
    coef = torch.exp(log_w)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef, max=epsilon_high).detach() * adv * logp
    else:
        clipped = torch.clamp(coef, 1 - epsilon_low, 1 + epsilon_high)
        per_token = -torch.min(coef * adv, clipped * adv)
    if isw is not None:
        per_token = per_token * isw
    kl = None
    if beta > 0:
        delta = ref - logp
        kl = torch.exp(delta) - delta - 1
        if bias_kl:
            kl = kl * coef
        per_token = per_token + beta * kl
    return per_token, coef, kl


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
    *,
    importance_sampling_level: str = "token",
    is_weight: Optional[torch.Tensor] = None,
    use_bias_correction_kl: bool = False,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Plain PyTorch autograd GRPO loss (module docstring has the definition)."""
    _validate(logp, old_logp, ref_logp, advantages, completion_mask, epsilon_low, epsilon_high, beta, loss_type,
              max_completion_length, importance_sampling_level, is_weight)
    B, T = logp.shape
    logp = logp.float()
    mask = completion_mask.to(torch.float32)
    old = logp.detach() if old_logp is None else old_logp.detach().float()
    adv = advantages.detach().float().reshape(B, 1)
    log_ratio = logp - old
    if importance_sampling_level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]
    else:
        log_w = log_ratio
    per_token, coef, kl = token_terms(logp, log_w, adv, _weight_2d(is_weight, B, T),
                                      None if beta <= 0 else ref_logp.detach().float(), loss_type=loss_type,
                                      epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
                                      bias_kl=use_bias_correction_kl)
    masked = per_token.expand(B, T) * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = T if max_completion_length is None else max_completion_length
        loss = masked.sum() / (B * length)
    else:  # dapo, cispo
        n = mask.sum() if num_items_in_batch is None else _as_float_tensor(num_items_in_batch, logp.device)
        loss = masked.sum() / n.clamp(min=1.0)
    with torch.no_grad():
        total = mask.sum().clamp(min=1.0)

        def token_mean(flag):
            return (flag.float().expand(B, T) * mask).sum() / total

        if loss_type == "cispo":
            metrics = {"cispo_clip_ratio": token_mean((coef > epsilon_high) & (adv > 0))}
        else:
            low = (coef < 1 - epsilon_low) & (adv < 0)
            high = (coef > 1 + epsilon_high) & (adv > 0)
            metrics = {"clip_ratio/low_mean": token_mean(low), "clip_ratio/high_mean": token_mean(high),
                       "clip_ratio/region_mean": token_mean(low | high)}
        if kl is not None:
            metrics["kl"] = (kl.expand(B, T) * mask).sum() / total
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
    def forward(ctx, logp, old, ref, adv, mask, roww, isw, seq, eps_low, eps_high, beta, cispo, kl_bias, need_grad):
        B, T = logp.shape
        n = B * T
        kernel = kernel_for(_kernel_fn(), logp.device)
        interp = is_interpreted(kernel)
        block = 256 if interp else 1024
        progs = cdiv(n, block)
        part = torch.empty(progs, 4, dtype=torch.float32, device=logp.device)
        grad = torch.empty_like(logp) if need_grad else None
        gradw = torch.empty_like(logp) if need_grad and seq is not None else None
        kernel[(progs,)](
            logp, old if old is not None else logp, ref if ref is not None else logp, adv, mask, roww,
            isw if isw is not None else logp, seq if seq is not None else adv,
            grad if grad is not None else part, gradw if gradw is not None else part, part,
            n, T, float(eps_low), float(eps_high), float(beta),
            HAS_OLD=old is not None, HAS_KL=beta > 0, HAS_ISW=isw is not None, SEQ=seq is not None,
            CISPO=bool(cispo), KL_BIAS=bool(kl_bias) and beta > 0, NEED_GRAD=need_grad, BLOCK=block,
            **({} if interp else {"num_warps": 4}),
        )
        if gradw is not None:  # logw[b] = masked mean of logp - old: spread each row's d loss / d logw over it
            grad = grad + (gradw.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)) * mask
        sums = part.sum(0)
        ctx.save_for_backward(grad)
        loss, low, high, kl = sums[0].clone(), sums[1].clone(), sums[2].clone(), sums[3].clone()
        ctx.mark_non_differentiable(low, high, kl)
        return loss, low, high, kl

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss,) + (None,) * 13


def _kernel_fn():
    from ._grpo_triton import grpo_token_kernel

    return grpo_token_kernel


def _metrics_from_sums(loss_type: str, low, high, kl, total, beta) -> Dict[str, torch.Tensor]:
    if loss_type == "cispo":
        metrics = {"cispo_clip_ratio": low / total}
    else:
        metrics = {"clip_ratio/low_mean": low / total, "clip_ratio/high_mean": high / total,
                   "clip_ratio/region_mean": (low + high) / total}
    if beta > 0:
        metrics["kl"] = kl / total
    return metrics


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
    *,
    importance_sampling_level: str = "token",
    is_weight: Optional[torch.Tensor] = None,
    use_bias_correction_kl: bool = False,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO loss as one fused Triton pass over [B, T] that also writes d loss / d logp.

    Same definition, signature and results as :func:`grpo_loss_reference`. Runs compiled on CUDA and
    in the Triton interpreter on CPU. Sequence-level weights (GSPO) add one row reduction in
    PyTorch before the pass and one after it (for the gradient).
    """
    _validate(logp, old_logp, ref_logp, advantages, completion_mask, epsilon_low, epsilon_high, beta, loss_type,
              max_completion_length, importance_sampling_level, is_weight)
    B, T = logp.shape
    if B * T >= 2**31:
        raise ValueError(f"B*T = {B * T} tokens is more than this kernel indexes (2**31 - 1)")
    lp = logp.float().contiguous()
    mask = completion_mask.to(torch.float32).contiguous()
    old = None if old_logp is None else old_logp.detach().float().contiguous()
    ref = None if beta <= 0 else ref_logp.detach().float().contiguous()
    adv = advantages.detach().float().reshape(B).contiguous()
    roww = _row_weights(mask, loss_type, max_completion_length, num_items_in_batch).float().contiguous()
    isw = _weight_2d(is_weight, B, T)
    isw = None if isw is None else isw.expand(B, T).contiguous()
    seq = None
    if importance_sampling_level == "sequence":
        ratio = torch.zeros_like(lp) if old is None else lp.detach() - old
        seq = ((ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).contiguous()
    total = mask.sum().clamp(min=1.0)
    if B * T == 0:
        zero = lp.sum() * 0
        z = torch.zeros((), device=lp.device)
        return zero, _metrics_from_sums(loss_type, z, z, z, total, beta)
    need_grad = torch.is_grad_enabled() and lp.requires_grad  # not ctx.needs_input_grad: True under no_grad
    loss, low, high, kl = _GRPOLossTriton.apply(lp, old, ref, adv, mask, roww, isw, seq, epsilon_low, epsilon_high,
                                                beta, loss_type == "cispo", use_bias_correction_kl, need_grad)
    return loss, _metrics_from_sums(loss_type, low, high, kl, total, beta)

"""The GRPO loss straight from hidden states and a *trained* lm_head: three GEMMs, bounded logits.

With the output head frozen (LoRA), :func:`~compilepass.kernels.selective_log_softmax` needs two
passes over ``[tokens x vocab]`` (the logits, then ``P @ W`` for the hidden gradient), as the
materialized version does. With the head trained it also needs ``dW = D.T @ hidden``, and since
autograd hands the log-probs' gradient over only in backward, the logits are computed a third
time there: four GEMM passes against PyTorch's three (which keeps the logits). Here the loss is
part of the function, so its gradient is known in the forward: per chunk of tokens the logits
are computed once into a ``[chunk, vocab]`` float32 buffer, the log-probs and each token's loss
gradient ``dL/dlogp`` follow, the buffer becomes ``D = dL/dlogits`` in place, and ``dH = D @ W``
and ``dW += D.T @ H`` finish the chunk: three GEMMs, logits never larger than one chunk. Backward
only scales the stored gradients by the incoming one.

Only losses that add up over tokens fit (each token's gradient depends on its own log-prob):
token-level importance weights, every ``loss_type``, KL (``beta``), a rollout IS weight, TRL's
bias-corrected KL. GSPO's sequence-level weights mix a row's tokens and are refused.

``fused_head_grpo_loss(hidden, weight, token_ids, temperature, old_logp, ref_logp, advantages,
completion_mask, ...)`` takes the :func:`~compilepass.kernels.grpo_loss` arguments for ``[B, T]``
completions (``hidden [B, T, H]``, ``token_ids [B, T]``) and returns ``(loss, logp)``: the loss
with gradients to ``hidden`` and (when it requires grad) ``weight``, and the detached float32
log-probs (the metrics come from them, e.g. ``grpo_loss_reference(logp, ...)`` under no_grad).
Memory: the ``chunk_bytes`` logits buffer, ``dH`` (hidden's size) and, for a trained head, a
float32 ``dW`` accumulator (``vocab x hidden x 4`` bytes).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton_support import addmm_fp32_acc_, cdiv, is_interpreted, kernel_for, mm_fp32_out, triton_available
from .dispatch import backend_for
from .grpo_loss import Number, _row_weights, _validate, _weight_2d, token_terms

__all__ = ["fused_head_grpo_loss"]


def _token_loss(lp, old, ref, adv, w, isw, **kw):
    """Each token's weighted loss term: the reference's per-token terms times its weight."""
    return token_terms(lp, lp - old, adv, isw, ref, **kw)[0] * w


IMPLS = ("auto", "torch", "triton")


def _kernels(device: torch.device):
    from ._fused_head_triton import logit_grad_kernel, row_stats_kernel

    return kernel_for(row_stats_kernel, device), kernel_for(logit_grad_kernel, device)


def _triton_row_stats(kernel, z, ids, inv_t):
    """(lse, target logit) of each row of ``z * inv_t``: one read of the buffer."""
    n, v = z.shape
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    tgt = torch.empty_like(lse)
    interp = is_interpreted(kernel)
    br, bv = (2, 64) if interp else (4, 2048)
    kernel[(cdiv(n, br),)](z, ids, lse, tgt, n, v, z.stride(0), float(inv_t), BLOCK_R=br, BLOCK_V=bv,
                           **({} if interp else {"num_warps": 8}))
    return lse, tgt


def _triton_logit_grad(kernel, z, lse, gs, ids, inv_t, dtype):
    """``D = gs * (onehot - softmax(z * inv_t))`` in ``dtype``: one read of the buffer, one write."""
    n, v = z.shape
    d = torch.empty((n, v), dtype=dtype, device=z.device)
    interp = is_interpreted(kernel)
    br, bv = (2, 64) if interp else (4, 1024)
    kernel[(cdiv(n, br), cdiv(v, bv))](z, d, lse, gs, ids, n, v, z.stride(0), d.stride(0), float(inv_t),
                                       BLOCK_R=br, BLOCK_V=bv, **({} if interp else {"num_warps": 4}))
    return d


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, ids, consts, temperature, chunk, need_w, loss_kw, use_triton):
        n, hdim = h.shape
        vocab = weight.shape[0]
        inv_t = 1.0 / temperature
        old, ref, adv, w, isw = consts
        dh = torch.empty_like(h)
        dw = torch.zeros(vocab, hdim, dtype=torch.float32, device=h.device) if need_w else None
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        stats_k, grad_k = _kernels(h.device) if use_triton else (None, None)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            hc, idc = h[r0:r1], ids[r0:r1, None]
            z = mm_fp32_out(hc, weight.t())  # GEMM 1: this chunk's logits (float32 out), the [tokens x vocab] buffer
            if z.dtype != torch.float32:  # a torch without a float32-out 16-bit GEMM on this device
                z = z.float()
            if use_triton:  # z stays unscaled: both kernels apply 1/T as they read it
                lse, tgt = _triton_row_stats(stats_k, z, ids[r0:r1], inv_t)
                lp = tgt - lse
            else:
                if temperature != 1.0:
                    z.mul_(inv_t)
                lse = torch.logsumexp(z, dim=1)
                lp = z.gather(1, idc).squeeze(1) - lse
            logp[r0:r1] = lp
            with torch.enable_grad():  # dL/dlogp of this chunk's tokens, from the [chunk]-sized loss
                lp_leaf = lp.detach().requires_grad_(True)
                old_c = lp.detach() if old is None else old[r0:r1]  # on-policy: ratio 1, with its gradient
                part = _token_loss(lp_leaf, old_c, *(None if c is None else c[r0:r1] for c in (ref, adv, w, isw)),
                                   **loss_kw).sum()
                (g,) = torch.autograd.grad(part, lp_leaf)
            total += part.detach()
            gs = g * inv_t
            if use_triton:
                d16 = _triton_logit_grad(grad_k, z, lse, gs, ids[r0:r1], inv_t, weight.dtype)
            else:
                d = z.sub_(lse[:, None]).exp_().mul_(-gs[:, None])  # D = g/T (onehot - p), over z's memory
                d.scatter_add_(1, idc, gs[:, None])
                d16 = d.to(weight.dtype)
                del d
            torch.mm(d16, weight, out=dh[r0:r1])  # GEMM 2: the hidden gradient
            if need_w:
                addmm_fp32_acc_(dw, d16.t(), hc)  # GEMM 3: the head's gradient, accumulated in float32
            del z, d16
        ctx.save_for_backward(dh, dw if need_w else None)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(logp)
        return total, logp

    @staticmethod
    def backward(ctx, grad, _grad_logp):
        dh, dw = ctx.saved_tensors
        scale = None if grad is None else grad.reshape(())
        dh = dh if scale is None else dh * scale.to(dh.dtype)
        if dw is not None:
            dw = (dw if scale is None else dw * scale).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None, None, None


def fused_head_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float,
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
    chunk_bytes: Optional[int] = None,
    impl: str = "auto",
):
    """``(loss, logp)``: the GRPO loss of ``token_ids`` [B, T] under ``softmax(hidden [B, T, H] @
    weight.T / temperature)`` and the detached float32 log-probs [B, T]; see the module docstring.
    ``chunk_bytes`` bounds the float32 logits buffer (``chunk x vocab x 4``); default 1 GiB, 4 GiB
    for a trained head (fewer read-modify-writes of the float32 ``dW``). ``impl``: the passes over
    that buffer through our Triton kernels (``"triton"``; on the CPU, Triton's interpreter) or
    PyTorch's ops (``"torch"``); ``"auto"``: as ``COMPILEPASS_KERNELS`` says (``triton`` forces the
    kernels, ``reference`` / ``chunked`` PyTorch's ops; unset: Triton on CUDA when it is installed)."""
    if importance_sampling_level != "token":
        raise ValueError("fused_head_grpo_loss needs token-level importance weights: a sequence-level weight "
                         "(GSPO) mixes a row's tokens; use selective_log_softmax + grpo_loss")
    if hidden.dim() != 3 or token_ids.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, H] and token_ids [B, T] (got {tuple(hidden.shape)}, "
                         f"{tuple(token_ids.shape)})")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[-1]}] (got {tuple(weight.shape)})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} (got {impl!r})")
    if impl == "triton" and not triton_available():
        raise ValueError("impl='triton' needs Triton installed")
    use_triton = impl == "triton" or (impl == "auto" and backend_for(hidden) == "triton")
    B, T = token_ids.shape
    placeholder = torch.zeros(B, T, dtype=torch.float32, device=hidden.device)
    _validate(placeholder, old_logp, ref_logp, advantages, completion_mask, epsilon_low, epsilon_high, beta, loss_type,
              max_completion_length, importance_sampling_level, is_weight)
    mask = completion_mask.to(torch.float32)
    w = (_row_weights(mask, loss_type, max_completion_length, num_items_in_batch)[:, None] * mask).reshape(-1)
    isw = _weight_2d(is_weight, B, T)
    consts = (
        None if old_logp is None else old_logp.detach().float().reshape(-1),
        None if beta <= 0 else ref_logp.detach().float().reshape(-1),
        advantages.detach().float().reshape(B, 1).expand(B, T).reshape(-1),
        w,
        None if isw is None else isw.expand(B, T).reshape(-1).float(),
    )
    h = hidden.reshape(B * T, -1)
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    ids = token_ids.reshape(-1).long()
    need_w = torch.is_grad_enabled() and weight.requires_grad
    if chunk_bytes is None:
        chunk_bytes = (4 << 30) if need_w else (1 << 30)
    chunk = max(1, int(chunk_bytes) // (4 * weight.shape[0]))
    loss_kw = dict(loss_type=loss_type, epsilon_low=float(epsilon_low), epsilon_high=float(epsilon_high),
                   beta=float(beta), bias_kl=bool(use_bias_correction_kl))
    loss, logp = _FusedHeadLoss.apply(h, weight, ids, consts, float(temperature), chunk, need_w, loss_kw, use_triton)
    return loss, logp.reshape(B, T)

"""Triton kernel for the GRPO loss: one fused elementwise pass over [B, T] (forward and gradient).

Imported lazily. Uses only Triton builtins (see ``_triton_support``).

Per token the kernel forms the log importance weight ``logw`` (``logp - old``, or the row's
sequence-level value ``seq_ptr[row]`` when SEQ), the policy term and the KL term, and writes two
gradients: ``d loss / d logp`` holding ``logw`` fixed, and ``d loss / d logw``. With token-level
weights both go to ``logp`` (``logw = logp - old``) and are written summed; with SEQ the second
is written apart, for the caller to spread over each row's tokens (``logw`` is the row's masked
mean of ``logp - old``).
"""

from __future__ import annotations

import triton.language as tl


def grpo_token_kernel(
    logp_ptr,  # [B*T] fp32
    old_ptr,  # [B*T] fp32 (unused unless HAS_OLD)
    ref_ptr,  # [B*T] fp32 (unused unless HAS_KL)
    adv_ptr,  # [B] fp32
    mask_ptr,  # [B*T] fp32
    roww_ptr,  # [B] fp32 normalization weight of each row's tokens
    isw_ptr,  # [B*T] fp32 constant weight of the policy term (unused unless HAS_ISW)
    seq_ptr,  # [B] fp32 sequence-level log importance weight (unused unless SEQ)
    grad_ptr,  # [B*T] fp32 d loss / d logp (written if NEED_GRAD; without SEQ it includes the logw path)
    gradw_ptr,  # [B*T] fp32 d loss / d logw (written if NEED_GRAD and SEQ)
    part_ptr,  # [programs, 4] fp32 partial sums: loss, low (cispo: capped), high, kl
    n_elem,
    T,
    eps_low,
    eps_high,
    beta,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_ISW: tl.constexpr,
    SEQ: tl.constexpr,
    CISPO: tl.constexpr,
    KL_BIAS: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elem
    row = offs // T
    lp = tl.load(logp_ptr + offs, mask=ok, other=0.0)
    if SEQ:
        logw = tl.load(seq_ptr + row, mask=ok, other=0.0)
    elif HAS_OLD:
        logw = lp - tl.load(old_ptr + offs, mask=ok, other=0.0)
    else:
        logw = lp - lp  # on-policy: old = logp.detach(), weight 1 with the weight's gradient
    m = tl.load(mask_ptr + offs, mask=ok, other=0.0)
    a = tl.load(adv_ptr + row, mask=ok, other=0.0)
    w = tl.load(roww_ptr + row, mask=ok, other=0.0)
    active = ok & (m != 0.0)

    coef = tl.exp(logw)
    if CISPO:
        # the weight capped at eps_high and detached, times the log-prob: gradient only through logp
        capped = tl.minimum(coef, eps_high)
        tok = -capped * a * lp
        d_lp = -capped * a
        d_w = tl.full([BLOCK], 0.0, tl.float32)
        low = (coef > eps_high) & (a > 0.0)  # CISPO's one clip count, kept in the "low" slot
        high = low & (a < 0.0)  # never true
    else:
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        clipped = tl.minimum(tl.maximum(coef, lo), hi)
        tok = -tl.minimum(coef * a, clipped * a)
        low = (coef < lo) & (a < 0.0)
        high = (coef > hi) & (a > 0.0)
        # Where the clipped branch is the minimum and clipping is active, no gradient flows.
        d_w = tl.where(low | high, 0.0, -a * coef)
        d_lp = tl.full([BLOCK], 0.0, tl.float32)
    if HAS_ISW:
        isw = tl.load(isw_ptr + offs, mask=ok, other=0.0)
        tok = tok * isw
        d_w = d_w * isw
        d_lp = d_lp * isw
    if HAS_KL:
        ref = tl.load(ref_ptr + offs, mask=ok, other=0.0)
        delta = ref - lp
        e = tl.exp(delta)
        kl = e - delta - 1.0
        if KL_BIAS:  # the k3 term weighted by the (differentiable) importance weight
            tok = tok + beta * kl * coef
            d_lp = d_lp + beta * (1.0 - e) * coef
            d_w = d_w + beta * kl * coef
            kl = kl * coef
        else:
            tok = tok + beta * kl
            d_lp = d_lp + beta * (1.0 - e)
        kl_sum = tl.reduce(tl.where(active, kl * m, 0.0), 0, tl.standard._sum_combine)
    else:
        kl_sum = 0.0

    mw = m * w
    loss_sum = tl.reduce(tl.where(active, tok * mw, 0.0), 0, tl.standard._sum_combine)
    low_sum = tl.reduce(tl.where(active & low, m, 0.0), 0, tl.standard._sum_combine)
    high_sum = tl.reduce(tl.where(active & high, m, 0.0), 0, tl.standard._sum_combine)
    if NEED_GRAD:
        if SEQ:
            tl.store(grad_ptr + offs, tl.where(active, d_lp * mw, 0.0), mask=ok)
            tl.store(gradw_ptr + offs, tl.where(active, d_w * mw, 0.0), mask=ok)
        else:
            tl.store(grad_ptr + offs, tl.where(active, (d_lp + d_w) * mw, 0.0), mask=ok)
    base = part_ptr + pid * 4
    tl.store(base + 0, loss_sum)
    tl.store(base + 1, low_sum)
    tl.store(base + 2, high_sum)
    tl.store(base + 3, kl_sum)

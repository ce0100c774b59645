"""Triton kernel for the GRPO loss: one fused elementwise pass over [B, T] (forward and gradient).

Imported lazily. Uses only Triton builtins (see ``_triton_support``).
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
    grad_ptr,  # [B*T] fp32 d loss / d logp (written if NEED_GRAD)
    part_ptr,  # [programs, 4] fp32 partial sums
    n_elem,
    T,
    eps_low,
    eps_high,
    beta,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elem
    row = offs // T
    lp = tl.load(logp_ptr + offs, mask=ok, other=0.0)
    if HAS_OLD:
        old = tl.load(old_ptr + offs, mask=ok, other=0.0)
    else:
        old = lp  # on-policy: old = logp.detach(), ratio == 1 with gradient ratio
    m = tl.load(mask_ptr + offs, mask=ok, other=0.0)
    a = tl.load(adv_ptr + row, mask=ok, other=0.0)
    w = tl.load(roww_ptr + row, mask=ok, other=0.0)
    active = ok & (m != 0.0)

    ratio = tl.exp(lp - old)
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    clipped = tl.minimum(tl.maximum(ratio, lo), hi)
    tok = -tl.minimum(ratio * a, clipped * a)
    low = (ratio < lo) & (a < 0.0)
    high = (ratio > hi) & (a > 0.0)
    # Where the clipped branch is the minimum and clipping is active, no gradient flows.
    dtok = tl.where(low | high, 0.0, -a * ratio)
    if HAS_KL:
        ref = tl.load(ref_ptr + offs, mask=ok, other=0.0)
        delta = ref - lp
        e = tl.exp(delta)
        kl = e - delta - 1.0
        tok = tok + beta * kl
        dtok = dtok + beta * (1.0 - e)
        kl_sum = tl.reduce(tl.where(active, kl * m, 0.0), 0, tl.standard._sum_combine)
    else:
        kl_sum = 0.0

    mw = m * w
    loss_sum = tl.reduce(tl.where(active, tok * mw, 0.0), 0, tl.standard._sum_combine)
    low_sum = tl.reduce(tl.where(active & low, m, 0.0), 0, tl.standard._sum_combine)
    high_sum = tl.reduce(tl.where(active & high, m, 0.0), 0, tl.standard._sum_combine)
    if NEED_GRAD:
        tl.store(grad_ptr + offs, tl.where(active, dtok * mw, 0.0), mask=ok)
    base = part_ptr + pid * 4
    tl.store(base + 0, loss_sum)
    tl.store(base + 1, low_sum)
    tl.store(base + 2, high_sum)
    tl.store(base + 3, kl_sum)

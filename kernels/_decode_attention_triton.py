"""Triton kernels for one-token (decode) attention over a static KV cache, split along the sequence.

Imported lazily. See ``_triton_support`` for why the bodies use only Triton builtins.

``partial_kernel``: one program per (sequence b, KV head h, split s). It reads the query rows of
the ``N_REP`` query heads that share KV head h (padded to ``NR`` >= 16 rows for ``tl.dot``) and
walks cache positions ``[s * CHUNK, min((s + 1) * CHUNK, length[b]))`` in ``BLOCK_S`` blocks with an
online softmax, so positions at or past ``length[b]`` are never read: a decode step costs the
sequence's current length, not the cache's size. It writes the split's running max ``m``, sum
``l`` and unnormalised output ``acc`` (fp32). A split that starts past the length writes
``m = -inf, l = 0, acc = 0``.

With one split (a cache of at most ``CHUNK`` positions) the program normalises and writes the output
itself. Otherwise only the ``N_REP`` real rows of the partials are written (the rows padding the dot
to 16 would be most of the traffic at small ``N_REP``).

``combine_kernel``: one program per (b, h): rescales the splits' partials to their common max and
writes ``sum(acc) / sum(l)`` for the ``N_REP`` real rows, in the output dtype.
"""

from __future__ import annotations

import triton.language as tl


def partial_kernel(
    q_ptr,  # [B, H, D] query of this step
    k_ptr,  # [B_cache, KV, S, D] (rows 0..B-1 used)
    v_ptr,
    len_ptr,  # [B] int64: positions attended, [0, length)
    m_ptr,  # [B * KV * SPLITS, NR] fp32
    l_ptr,  # [B * KV * SPLITS, NR] fp32
    acc_ptr,  # [B * KV * SPLITS, NR, D] fp32
    out_ptr,  # [B, H, D]: written here directly when SPLITS == 1 (no partials, no combine)
    stride_ob,
    stride_oh,
    KV,
    N_REP,
    CHUNK,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    scale,
    SPLITS: tl.constexpr,
    NR: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // KV
    kvh = pid % KV
    length = tl.load(len_ptr + b)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)

    rows = tl.arange(0, NR)
    dims = tl.arange(0, D)
    row_ok = rows < N_REP
    q = tl.load(q_ptr + b * stride_qb + (kvh * N_REP + rows)[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:  # the interpreter has no 16-bit float dot
        q = q.to(tl.float32)

    m = tl.full([NR], float("-inf"), tl.float32)
    l = tl.full([NR], 0.0, tl.float32)
    acc = tl.full([NR, D], 0.0, tl.float32)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    for s0 in range(start, end, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs < end
        k = tl.load(k_base + offs[:, None] * stride_ks + dims[None, :], mask=s_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k)) * scale  # [NR, BLOCK_S] fp32
        scores = tl.where(s_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(scores, 1, tl.standard._elementwise_max))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        v = tl.load(v_base + offs[:, None] * stride_vs + dims[None, :], mask=s_ok[:, None], other=0.0)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    if SPLITS == 1:  # the whole sequence in this program: normalise and write the output
        y = acc / l[:, None]
        tl.store(out_ptr + b * stride_ob + (kvh * N_REP + rows)[:, None] * stride_oh + dims[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:  # only the N_REP real rows: the padding rows of the dot are never written nor read back
        slot = pid * SPLITS + split
        tl.store(m_ptr + slot * NR + rows, m, mask=row_ok)
        tl.store(l_ptr + slot * NR + rows, l, mask=row_ok)
        tl.store(acc_ptr + (slot * NR + rows)[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])


def combine_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,  # [B, H, D]
    KV,
    N_REP,
    stride_ob,
    stride_oh,
    SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    NR: tl.constexpr,
    D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // KV
    kvh = pid % KV
    rows = tl.arange(0, NR)
    dims = tl.arange(0, D)
    row_ok = rows < N_REP  # the partial kernel wrote these rows only
    splits = tl.arange(0, SPLITS_P2)
    base = pid * SPLITS
    ms = tl.load(m_ptr + (base + splits)[:, None] * NR + rows[None, :],
                 mask=(splits < SPLITS)[:, None] & row_ok[None, :], other=float("-inf"))  # [SPLITS_P2, NR]
    m_all = tl.reduce(ms, 0, tl.standard._elementwise_max)  # [NR]; split 0 always holds position 0
    num = tl.full([NR, D], 0.0, tl.float32)
    den = tl.full([NR], 0.0, tl.float32)
    for s in range(0, SPLITS):
        m_s = tl.load(m_ptr + (base + s) * NR + rows, mask=row_ok, other=float("-inf"))
        w = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m_all))
        den += w * tl.load(l_ptr + (base + s) * NR + rows, mask=row_ok, other=0.0)
        num += w[:, None] * tl.load(acc_ptr + ((base + s) * NR + rows)[:, None] * D + dims[None, :],
                                    mask=row_ok[:, None], other=0.0)
    y = num / tl.where(row_ok, den, 1.0)[:, None]
    tl.store(out_ptr + b * stride_ob + (kvh * N_REP + rows)[:, None] * stride_oh + dims[None, :],
             y.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

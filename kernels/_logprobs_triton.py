"""Triton kernel for selective log-softmax: one GEMM tile of logits plus a softmax epilogue.

Imported lazily (only when a Triton path runs). See ``_triton_support`` for why the body uses only
Triton builtins.

One program computes one ``[BLOCK_M tokens x BLOCK_N vocab]`` tile of
``S = (hidden @ weight.T) * inv_temp`` in fp32 registers (``tl.dot`` over hidden in BLOCK_K steps,
16-bit operands, fp32 accumulator), then, depending on ``MODE``:

* ``MODE_LSE``   (0): writes the tile's per-row log-sum-exp to ``stat0[row, tile]`` and, in the one
  tile that holds the row's target id, the target logit to ``tgt[row]``. Nothing of size
  tokens x vocab is written.
* ``MODE_PROBS`` (1): writes ``P = exp(S - tile_max)`` in the weight dtype with the target column
  zeroed, the tile max to ``stat0[row, tile]``, the tile's sum of ``exp(S - tile_max)`` (target
  included) to ``stat1[row, tile]`` and the target logit to ``tgt``. Used on bounded chunks only.
* ``MODE_DLOGITS`` (2): writes ``D = gscale[row] * (onehot(target) - exp(S - lse[row]))``, the
  gradient of the log-probs w.r.t. the logits (temperature folded into ``gscale``), on bounded
  chunks only.

With ``ENTROPY`` (modes 0 and 1), the tile also writes the entropy of its own softmax,
``log(sum_j e_j) + sum_j e_j (max - s_j) / sum_j e_j`` with ``e_j = exp(s_j - max)``, to
``ent[row, tile]``: a sum of non-negative terms, so a confident row's small entropy is not the
difference of two large numbers. The host combines tiles by the chain rule of entropy,
``H = sum_t w_t (H_t - log w_t)`` with ``w_t = exp(lse_t - lse)``.

Programs are ordered in groups of GROUP_M row blocks (as in the Triton matmul tutorial) so that a
group's hidden rows and the weight tiles it walks over stay in L2.
"""

from __future__ import annotations

import triton.language as tl

MODE_LSE = 0
MODE_PROBS = 1
MODE_DLOGITS = 2


def logits_tile_kernel(
    h_ptr,  # [M, K] hidden rows of this launch
    w_ptr,  # [VN, K] weight rows of this launch (already offset to the launch's first vocab id)
    ids_ptr,  # [M] int64 absolute target ids
    out_ptr,  # MODE 1: P [M, >= tiles*BLOCK_N]; MODE 2: D [M, >= VN]; MODE 0: unused
    stat0_ptr,  # MODE 0: tile lse [M, tiles]; MODE 1: tile max [M, tiles]
    stat1_ptr,  # MODE 1: tile sum-exp [M, tiles]
    tgt_ptr,  # MODE 0/1: [M] fp32 target logit
    lse_ptr,  # MODE 2: [M] fp32 log-sum-exp
    gscale_ptr,  # MODE 2: [M] fp32 upstream grad * inv_temp
    ent_ptr,  # ENTROPY (MODE 0/1): [M, tiles] fp32 entropy of the tile's softmax (stride_stat)
    M,
    VN,
    K,
    v_start,
    stride_h,
    stride_w,
    stride_out,
    stride_stat,
    inv_temp,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (VN + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    col_ok = offs_n < VN
    # Out-of-range rows/cols read valid memory (wrapped); their results are masked at the end.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % VN).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rm[:, None] * stride_h + offs_k[None, :]
    b_ptrs = w_ptr + rn[:, None] * stride_w + offs_k[None, :]

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter has no 16-bit float dot
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    s = tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))
    # Target column within this launch, clamped so that the int32 compare below is exact; -1 and VN
    # match no valid column.
    tcol = tl.minimum(tl.maximum(tl.load(ids_ptr + rm) - v_start, -1), VN).to(tl.int32)
    is_t = (offs_n[None, :] == tcol[:, None]) & col_ok[None, :]

    if MODE == 2:
        lse = tl.load(lse_ptr + rm)
        gs = tl.load(gscale_ptr + rm)
        p = tl.exp(s - lse[:, None])
        d = gs[:, None] * (tl.where(is_t, 1.0, 0.0) - p)
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
        tl.store(out_ptrs, d.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        t_val = tl.reduce(tl.where(is_t, s, 0.0), 1, tl.standard._sum_combine)
        has_t = tl.reduce(is_t.to(tl.int32), 1, tl.standard._sum_combine) > 0
        tl.store(tgt_ptr + offs_m, t_val, mask=row_ok & has_t)
        m = tl.reduce(s, 1, tl.standard._elementwise_max)
        e = tl.exp(s - m[:, None])  # 0 in masked columns
        l = tl.reduce(e, 1, tl.standard._sum_combine)
        stat_offs = offs_m.to(tl.int64) * stride_stat + pid_n
        if ENTROPY:
            gap = e * tl.where(col_ok[None, :], m[:, None] - s, 0.0)  # e * (max - s); 0 past VN, not 0 * inf
            tl.store(ent_ptr + stat_offs, tl.log(l) + tl.reduce(gap, 1, tl.standard._sum_combine) / l, mask=row_ok)
        if MODE == 0:
            tl.store(stat0_ptr + stat_offs, m + tl.log(l), mask=row_ok)
        else:
            tl.store(stat0_ptr + stat_offs, m, mask=row_ok)
            tl.store(stat1_ptr + stat_offs, l, mask=row_ok)
            p = tl.where(is_t, 0.0, e)
            out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
            # Whole tiles are written (zeros past VN), so the buffer can be viewed as [M, tiles, BLOCK_N].
            tl.store(out_ptrs, p.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

"""Triton kernel: ``y = x @ dequant(W).T`` with W in bitsandbytes' NF4 layout, dequantized in registers.

Imported lazily. See ``_triton_support`` for why the body uses only Triton builtins.

W [N, K] is stored as bitsandbytes packs it: the row-major elements two per byte, the first in the
high nibble (byte ``n * K/2 + j`` holds elements ``2j`` and ``2j + 1`` of row n); each element is an
index into the 16-value NF4 ``code``; every ``BLOCKSIZE`` consecutive elements (flat index) share one
scale ``absmax``. With double quantization (``NESTED``) that scale is itself a byte: ``code2[byte] *
absmax2[block // BLOCKSIZE2] + offset``.

One program per (M tile, N tile, K split). It walks its share of the packed columns ``BLOCK_KH``
bytes at a time: the high nibbles are the even columns of W, the low nibbles the odd ones, so the
tile's product is ``x[:, even] @ W_hi.T + x[:, odd] @ W_lo.T`` and nothing is interleaved. The fp32
partial sums of each split go to ``part`` [SPLIT_K, M, N]; the caller adds the splits (split-K fills
the GPU when M, the decode batch, gives few tiles).
"""

from __future__ import annotations

import triton.language as tl


def nf4_matmul_kernel(
    x_ptr,  # [M, K] activations (stride_xm, 1)
    w_ptr,  # [N * K / 2] uint8 packed codes
    absmax_ptr,  # [N * K / BLOCKSIZE]: uint8 (NESTED) or fp32 scales
    absmax2_ptr,  # NESTED: [ceil(blocks / BLOCKSIZE2)] fp32
    code2_ptr,  # NESTED: [256] fp32
    code_ptr,  # [16] fp32 NF4 values
    offset_ptr,  # NESTED: [] fp32 added to every dequantized scale (a pointer: no host read in a graph)
    part_ptr,  # [SPLIT_K, M, N] fp32
    M,
    N,
    K,
    KH_SPLIT,  # packed columns per split (a multiple of BLOCK_KH)
    stride_xm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot's input_precision on the fp32 path ("tf32x3" on a GPU: ~fp32)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    KH = K // 2
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rn64 = rn.to(tl.int64)  # rn * K passes 2**31 for N x K weights of 2**31 elements (a large quantized head)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    if NESTED:
        offset = tl.load(offset_ptr)
    j_start = pid_k * KH_SPLIT
    j_end = tl.minimum(j_start + KH_SPLIT, KH)
    for j0 in range(j_start, j_end, BLOCK_KH):
        j = j0 + tl.arange(0, BLOCK_KH)
        j_ok = j < j_end
        w_ok = n_ok[:, None] & j_ok[None, :]
        packed = tl.load(w_ptr + rn64[:, None] * KH + j[None, :], mask=w_ok, other=0).to(tl.int32)
        w_hi = tl.load(code_ptr + (packed >> 4))  # [BLOCK_N, BLOCK_KH] fp32
        w_lo = tl.load(code_ptr + (packed & 15))
        block = (rn64[:, None] * K + 2 * j[None, :]) // BLOCKSIZE  # elements 2j and 2j+1 share it
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=w_ok, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=w_ok, other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=w_ok, other=0.0)
        w_hi = tl.where(w_ok, w_hi * scale, 0.0)
        w_lo = tl.where(w_ok, w_lo * scale, 0.0)
        x_ok = m_ok[:, None] & j_ok[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :], mask=x_ok, other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :] + 1, mask=x_ok, other=0.0)
        if UPCAST:  # fp32 inputs, or the interpreter (no 16-bit float dot)
            acc += tl.dot(x_even.to(tl.float32), tl.trans(w_hi), input_precision=PRECISION)
            acc += tl.dot(x_odd.to(tl.float32), tl.trans(w_lo), input_precision=PRECISION)
        else:
            acc += tl.dot(x_even, tl.trans(w_hi.to(x_even.dtype)))
            acc += tl.dot(x_odd, tl.trans(w_lo.to(x_odd.dtype)))
    out = part_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])

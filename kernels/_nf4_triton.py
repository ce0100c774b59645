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

``ALIGNED`` (K a multiple of the block size, ``BLOCK_KH = BLOCKSIZE / 2``): each step covers exactly
one quantization block of each of the tile's rows, so the step multiplies the *unscaled* codes and
scales the ``[BLOCK_M, BLOCK_N]`` product by one scale per row of W, loaded once per row (not one
gathered scale, and a 64-bit division, per element as in the general path).

``nf4_dequant_kernel`` writes the whole 16-bit W (flat, bitsandbytes' element order) for batches of
many rows (prefill), where one dequantization and a cuBLAS GEMM beat dequantizing every tile once
per M tile.
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
    ALIGNED: tl.constexpr = False,  # K % BLOCKSIZE == 0 and BLOCK_KH == BLOCKSIZE // 2 (module doc)
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
        w_hi = tl.where(w_ok, tl.load(code_ptr + (packed >> 4)), 0.0)  # [BLOCK_N, BLOCK_KH] fp32 codes
        w_lo = tl.where(w_ok, tl.load(code_ptr + (packed & 15)), 0.0)
        if ALIGNED:  # one block per row in this step: its scale multiplies the product (module doc)
            row_block = rn64 * (K // BLOCKSIZE) + (2 * j0) // BLOCKSIZE  # [BLOCK_N]
            if NESTED:
                q_row = tl.load(absmax_ptr + row_block, mask=n_ok, other=0).to(tl.int32)
                row_scale = (tl.load(code2_ptr + q_row) * tl.load(absmax2_ptr + row_block // BLOCKSIZE2, mask=n_ok,
                                                                  other=0.0) + offset)
            else:
                row_scale = tl.load(absmax_ptr + row_block, mask=n_ok, other=0.0)
        else:
            block = (rn64[:, None] * K + 2 * j[None, :]) // BLOCKSIZE  # elements 2j and 2j+1 share it
            if NESTED:
                q = tl.load(absmax_ptr + block, mask=w_ok, other=0).to(tl.int32)
                scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=w_ok, other=0.0) + offset
            else:
                scale = tl.load(absmax_ptr + block, mask=w_ok, other=0.0)
            w_hi = w_hi * scale
            w_lo = w_lo * scale
        x_ok = m_ok[:, None] & j_ok[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :], mask=x_ok, other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :] + 1, mask=x_ok, other=0.0)
        if UPCAST:  # fp32 inputs, or the interpreter (no 16-bit float dot)
            prod = tl.dot(x_even.to(tl.float32), tl.trans(w_hi), input_precision=PRECISION)
            prod += tl.dot(x_odd.to(tl.float32), tl.trans(w_lo), input_precision=PRECISION)
        else:
            prod = tl.dot(x_even, tl.trans(w_hi.to(x_even.dtype)))
            prod += tl.dot(x_odd, tl.trans(w_lo.to(x_odd.dtype)))
        if ALIGNED:
            acc += prod * row_scale[None, :]
        else:
            acc += prod
    out = part_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def nf4_dequant_kernel(
    w_ptr,  # [NUMEL / 2] uint8 packed codes
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    code_ptr,
    offset_ptr,
    out_ptr,  # [NUMEL] the 16-bit (or fp32) weight, bitsandbytes' flat element order
    NBYTES,  # packed bytes (NUMEL / 2)
    BLOCK: tl.constexpr,  # packed bytes per program
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < NBYTES
    packed = tl.load(w_ptr + i, mask=ok, other=0).to(tl.int32)
    block = (2 * i) // BLOCKSIZE  # elements 2i and 2i+1 share it (an even block size)
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        scale = (tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=ok, other=0.0)
                 + tl.load(offset_ptr))
    else:
        scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    hi = tl.load(code_ptr + (packed >> 4)) * scale
    lo = tl.load(code_ptr + (packed & 15)) * scale
    tl.store(out_ptr + 2 * i, hi.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptr + 2 * i + 1, lo.to(out_ptr.dtype.element_ty), mask=ok)

"""Triton kernels of :mod:`~compilepass.kernels.fused_head_loss`: the two passes over one chunk's
float32 logits buffer ``z [rows, V]`` (row stride ``stride_z``), with the temperature applied
inside (``s = z * inv_t``).

* ``row_stats_kernel``: per row, ``lse = logsumexp(s)`` (online max and sum, one read of the row)
  and the target's scaled logit ``s[id]``;
* ``logit_grad_kernel``: ``D = gs * (onehot(id) - exp(s - lse))`` written in D's dtype (the head's
  16-bit dtype), one read of ``z`` and one write of ``D``; ``gs`` is each row's ``dL/dlogp / T``.

PyTorch's version of the same (``logsumexp``, then ``sub_ / exp_ / mul_ / scatter_add_`` and a cast)
reads and writes the buffer about eight times. Imported lazily; builtins only (see
``_triton_support``).
"""

from __future__ import annotations

import triton.language as tl


def row_stats_kernel(
    z_ptr,  # [N, V] float32 logits (unscaled)
    ids_ptr,  # [N] int64 target ids
    lse_ptr,  # [N] float32 out: logsumexp of the scaled row
    tgt_ptr,  # [N] float32 out: the target's scaled logit
    N,
    V,
    stride_z,
    inv_t,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    base = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    tid = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.full([BLOCK_R], 0.0, tl.float32)
    t = tl.full([BLOCK_R], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < V)[None, :]
        s = tl.load(base + cols[None, :], mask=ok, other=float("-inf")) * inv_t
        m_new = tl.maximum(m, tl.reduce(s, 1, tl.standard._elementwise_max))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: no inf - inf
        l = l * tl.exp(m - m_ref) + tl.reduce(tl.exp(s - m_ref[:, None]), 1, tl.standard._sum_combine)
        m = m_new
        t += tl.reduce(tl.where(cols[None, :] == tid[:, None], s, 0.0), 1, tl.standard._sum_combine)
    tl.store(lse_ptr + rows, m + tl.log(tl.where(row_ok, l, 1.0)), mask=row_ok)  # no log(0) past the rows
    tl.store(tgt_ptr + rows, t, mask=row_ok)


def logit_grad_kernel(
    z_ptr,  # [N, V] float32 logits (unscaled)
    d_ptr,  # [N, V] out: dL/dz in the head's dtype (row stride stride_d)
    lse_ptr,  # [N] float32
    gs_ptr,  # [N] float32: dL/dlogp / T
    ids_ptr,  # [N] int64
    N,
    V,
    stride_z,
    stride_d,
    inv_t,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < V)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    s = tl.load(z_ptr + rows64 * stride_z + cols[None, :], mask=ok, other=0.0) * inv_t
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    gs = tl.load(gs_ptr + rows, mask=row_ok, other=0.0)
    tid = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(s - lse[:, None])
    d = gs[:, None] * (tl.where(cols[None, :] == tid[:, None], 1.0, 0.0) - p)
    tl.store(d_ptr + rows64 * stride_d + cols[None, :], d.to(d_ptr.dtype.element_ty), mask=ok)

"""Decode attention (one query token per sequence) that reads each sequence's cache only up to its length.

The rollout engine keeps a static KV cache of ``max_len`` positions so that a CUDA graph can replay
every decode step. Attention written as two batched matmuls over that cache (``attention="matmul"``)
reads all ``max_len`` positions at every step, whatever the sequence's length. This kernel walks
positions ``[0, length[b])`` only, in ``CHUNK``-long splits that run as separate programs and are
combined afterwards (flash-decoding), so a step costs the sequences' current lengths and long caches
still spread over the GPU at small batch. Grouped-query attention is native: the query heads that
share a KV head are the rows of one program, K and V are read once for all of them.

``decode_attention(q, k_cache, v_cache, lengths, scale)`` is the ``compilepass::decode_attention``
custom op: eager, inside ``torch.compile`` (an opaque call that Inductor schedules like any extern
kernel, symbolic batch included) and inside CUDA graphs (no host synchronisation, no data-dependent
shapes). CUDA tensors run the compiled Triton kernels; CPU tensors run them in the Triton interpreter
(tests). ``decode_attention_reference`` is the plain PyTorch definition it is tested against.
"""

from __future__ import annotations

import torch

from ._triton_support import cdiv, is_interpreted, kernel_for

BLOCK_S = 64
MIN_CHUNK = 128
MAX_SPLITS = 64


def split_plan(max_len: int) -> tuple[int, int]:
    """(chunk, splits) for a cache of ``max_len`` positions: chunks of >= 128 positions (a multiple
    of the 64-position block), at most 64 splits."""
    chunk = MIN_CHUNK
    while cdiv(max_len, chunk) > MAX_SPLITS:
        chunk *= 2
    return chunk, cdiv(max_len, chunk)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def supported(head_dim: int) -> bool:
    """The kernel needs a power-of-two head size of at least 16 (``tl.dot`` / ``tl.arange``)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D]; k/v cache [>= B, KV, S, D]; lengths [B] -> [B, H, D] in q's dtype (fp32 math)."""
    B, H, D = q.shape
    KV, S = k_cache.shape[1], k_cache.shape[2]
    k = k_cache[:B].float().repeat_interleave(H // KV, dim=1)
    v = v_cache[:B].float().repeat_interleave(H // KV, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k) * scale
    valid = torch.arange(S, device=q.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v).to(q.dtype)


def _check(q, k_cache, v_cache, lengths) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: q [B, H, D] and k/v caches [B, KV, S, D] expected, got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, D = q.shape
    KV = k_cache.shape[1]
    if k_cache.shape[0] < B or k_cache.shape[3] != D or H % KV:
        raise ValueError(f"decode_attention: shapes do not match: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if not supported(D):
        raise ValueError(f"decode_attention: head size {D} is not a power of two >= 16")
    if lengths.shape != (B,):
        raise ValueError(f"decode_attention: lengths must have shape ({B},), got {tuple(lengths.shape)}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("decode_attention: the caches' last dimension must be contiguous")


def _partial_fn():
    from ._decode_attention_triton import partial_kernel

    return partial_kernel


def _combine_fn():
    from ._decode_attention_triton import combine_kernel

    return combine_kernel


@torch.library.custom_op("compilepass::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of ``q`` [B, H, D] (one token per sequence) over cache positions [0, lengths[b]) of
    rows 0..B-1 of ``k_cache`` / ``v_cache`` [B_cache, KV, S, D]. Returns [B, H, D] in q's dtype.
    Every length must be in [1, S]."""
    _check(q, k_cache, v_cache, lengths)
    B, H, D = q.shape
    KV, S = k_cache.shape[1], k_cache.shape[2]
    n_rep = H // KV
    nr = max(16, _next_pow2(n_rep))
    chunk, splits = split_plan(S)
    q = q.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    out = q.new_empty(q.shape)
    if B == 0:
        return out
    if splits == 1:  # the partial kernel writes the output itself: no partials, no combine
        m = l = acc = out
    else:
        m = torch.empty((B * KV * splits, nr), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((B * KV * splits, nr, D), dtype=torch.float32, device=q.device)
    partial = kernel_for(_partial_fn(), q.device)
    interp = is_interpreted(partial)
    opts = {} if interp else {"num_warps": 4, "num_stages": 2}
    partial[(B * KV, splits)](
        q, k_cache, v_cache, lengths, m, l, acc, out, out.stride(0), out.stride(1),
        KV, n_rep, chunk,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        float(scale),
        SPLITS=splits, NR=nr, D=D, BLOCK_S=BLOCK_S,
        UPCAST=(interp and q.dtype != torch.float32),
        **opts,
    )
    if splits == 1:
        return out
    combine = kernel_for(_combine_fn(), q.device)
    combine[(B * KV,)](
        m, l, acc, out, KV, n_rep, out.stride(0), out.stride(1),
        SPLITS=splits, SPLITS_P2=_next_pow2(splits), NR=nr, D=D,
        **({} if interp else {"num_warps": 4}),
    )
    return out


@decode_attention.register_fake
def _(q, k_cache, v_cache, lengths, scale):
    return q.new_empty(q.shape)

"""Per-token log-probabilities of chosen tokens, straight from hidden states and the lm_head weight.

    logp[n] = log_softmax((hidden[n] @ weight.T) / temperature)[token_ids[n]]

Three implementations with one signature (``hidden [..., H]``, ``weight [V, H]``, ``token_ids [...]``,
result ``float32 [...]``; with ``return_entropy=True`` also the softmax's entropy per token, no
gradient, from the same logits: the ``entropy`` metric without a second pass over the vocabulary):

* :func:`selective_log_softmax_reference` - plain PyTorch, materializes the ``[tokens, vocab]`` logits
  in float32. The test oracle and the benchmark baseline.
* :func:`selective_log_softmax_chunked` - plain PyTorch, chunked over tokens, logits recomputed in
  backward. What the dispatcher uses on CPU.
* :func:`selective_log_softmax_triton` - Triton GEMM tiles with a softmax epilogue plus cuBLAS GEMMs on
  bounded chunks; never holds a ``[tokens, vocab]`` tensor. What the dispatcher uses on CUDA.

Design of the Triton path (N tokens, V vocab, H hidden; see ``_logprobs_triton`` for the kernel):

* No gradient needed: one kernel over ``[token chunk x whole vocab]`` computes 128x128-ish logit
  tiles in registers and writes one float per (token, vocab tile): the tile's log-sum-exp. The
  largest temporary is that ``[chunk, V / BLOCK_N]`` float32 buffer, capped at 32 MiB.
* Gradient for ``hidden`` needed (the LoRA case): the forward also computes, with an online softmax
  over vocab chunks, ``C[n] = dlogp[n]/dhidden[n] * temperature = sum_v p[n,v] (W[t_n] - W[v])``.
  For a token chunk and a vocab chunk the kernel writes ``exp(S - tile_max)`` (bf16, target column
  zeroed) to a ``[token_chunk, vocab_chunk]`` buffer, the tiles are rescaled to the running max, and
  cuBLAS accumulates ``P @ W_chunk`` into an fp32 ``[token_chunk, H]`` accumulator. ``C`` is saved
  in the weight dtype; backward is ``grad_hidden = C * grad / temperature``, done in place in C's
  memory. Zeroing the target column and adding ``(1 - p_target) W[target]`` separately keeps C
  accurate when the model is confident (no cancellation of ``W[t] - E[W]``).
  Two GEMM passes in total (forward logits and ``P @ W``), the same as the materialized version.
* Gradient for ``weight`` needed (full fine-tuning only; under LoRA the lm_head is frozen and none
  of this runs or allocates): backward recomputes logits per vocab chunk, writes
  ``D = g/T (onehot - p)`` for all tokens x that chunk, and ``grad_W[chunk] = D.T @ hidden`` on
  cuBLAS, fp32-accumulated over all tokens in one GEMM.

Bound on temporaries (defaults, bf16): P chunk ``token_chunk x vocab_chunk x 2 B`` = 2048 x 16384 x 2
= 64 MiB, two fp32 ``[token_chunk, H]`` buffers (32 MiB each at H=4096), tile statistics; ``D`` chunk
for the weight gradient <= ``chunk_bytes`` (128 MiB). Plus the saved ``C`` (``N x H`` in the weight
dtype), which backward turns into the hidden gradient in place, so the pair costs what the hidden
gradient costs anyway. Nothing scales with ``N x V``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ._triton_support import (
    INTERPRETER_CONFIG,
    TileConfig,
    cdiv,
    is_interpreted,
    kernel_for,
    mm_fp32_out,
    pick_config,
)

__all__ = [
    "selective_log_softmax_reference",
    "selective_log_softmax_chunked",
    "selective_log_softmax_triton",
    "TileConfig",
]


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, temperature: float):
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match weight {tuple(weight.shape)}")
    if tuple(token_ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"token_ids shape {tuple(token_ids.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def _empty_result(h: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    # No tokens: an empty float32 result, still connected to hidden so that backward works.
    return (h.sum() * 0).float().expand(token_ids.shape).clone()


def _with_entropy(logp: torch.Tensor, return_entropy: bool):
    """``logp``, or ``(logp, zero-size entropies)`` for a call with no tokens."""
    return (logp, torch.zeros(logp.shape, dtype=torch.float32, device=logp.device)) if return_entropy else logp


def logits_entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Entropy per row of ``softmax(logits)`` (float32 logits [rows, V], their log-sum-exp [rows]),
    ``sum_v p_v (lse - s_v)``: non-negative terms."""
    gap = lse[:, None] - logits
    return (torch.exp(-gap) * gap).sum(dim=1)


# --------------------------------------------------------------------------------------------------
# Reference: materialized logits
# --------------------------------------------------------------------------------------------------


def selective_log_softmax_reference(
    hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Materialized-logits reference: ``log_softmax(float32(hidden @ weight.T) / T).gather(token_ids)``.

    The matmul runs in the inputs' dtype (as an lm_head does), the softmax in float32. Peak memory
    is several ``tokens x vocab`` float32 tensors; that is the point of the other implementations.
    """
    _check_inputs(hidden, weight, token_ids, temperature)
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    logits = (h @ weight.t()).float()
    if temperature != 1.0:
        logits = logits.div_(temperature)  # in place: neither mm nor the cast saves its output
    logp = torch.log_softmax(logits, dim=-1)
    out = logp.gather(-1, token_ids.reshape(-1, 1).long()).squeeze(-1).reshape(token_ids.shape)
    if not return_entropy:
        return out
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return out, entropy.reshape(token_ids.shape)


# --------------------------------------------------------------------------------------------------
# Pure-PyTorch chunked version (CPU path of the dispatcher)
# --------------------------------------------------------------------------------------------------


class _ChunkedSelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, ids, temperature, chunk, with_entropy):
        n = h.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=h.device)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            logits = (h[r0:r1] @ weight.t()).float()
            if temperature != 1.0:
                logits.div_(temperature)
            lse_c = torch.logsumexp(logits, dim=-1)
            out[r0:r1] = logits.gather(1, ids[r0:r1, None]).squeeze(1) - lse_c
            lse[r0:r1] = lse_c
            if with_entropy:
                entropy[r0:r1] = logits_entropy(logits, lse_c)
        ctx.save_for_backward(h, weight, ids, lse)
        ctx.temperature = temperature
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad, _grad_entropy):
        h, weight, ids, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        inv_t = 1.0 / ctx.temperature
        n = h.shape[0]
        grad = grad.float()
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for r0 in range(0, n, ctx.chunk):
            r1 = min(n, r0 + ctx.chunk)
            logits = (h[r0:r1] @ weight.t()).float()
            if ctx.temperature != 1.0:
                logits.div_(ctx.temperature)
            gs = grad[r0:r1] * inv_t
            d = torch.exp_(logits.sub_(lse[r0:r1, None])).mul_(-gs[:, None])  # -g/T * p
            d.scatter_add_(1, ids[r0:r1, None], gs[:, None])  # + g/T at the target
            if need_h:
                dh[r0:r1] = (d.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                dw.addmm_(d.t(), h[r0:r1].float())
        return dh, (dw.to(weight.dtype) if need_w else None), None, None, None, None


def selective_log_softmax_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_size: Optional[int] = None,
    return_entropy: bool = False,
):
    """Pure-PyTorch version chunked over tokens; logits of one chunk at a time (recomputed in backward).

    ``chunk_size`` tokens per chunk; by default chosen so a chunk's float32 logits take ~256 MiB.
    Gradients: hidden (in its dtype) and, only when ``weight.requires_grad``, weight (accumulated
    in float32). ``return_entropy``: ``(logp, entropy)``, the entropies (no gradient) from the same
    chunks of logits.
    """
    _check_inputs(hidden, weight, token_ids, temperature)
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    ids = token_ids.reshape(-1).long()
    if chunk_size is None:
        chunk_size = max(1, (256 << 20) // (4 * weight.shape[0]))
    if h.shape[0] == 0:
        return _with_entropy(_empty_result(h, token_ids), return_entropy)
    out, entropy = _ChunkedSelectiveLogSoftmax.apply(h, weight, ids, float(temperature), int(chunk_size),
                                                     bool(return_entropy))
    out = out.reshape(token_ids.shape)
    return (out, entropy.reshape(token_ids.shape)) if return_entropy else out


# --------------------------------------------------------------------------------------------------
# Triton version
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    token_chunk: int
    vocab_chunk: int
    chunk_bytes: int
    lse_buffer_bytes: int
    config: Optional[TileConfig]


# Candidate tiles for sm_80/sm_90, 16-bit inputs (checked to compile without spills for sm_90 by
# tests/test_kernels_logprobs.py). The first is used when tuning is off.
_CUDA_CANDIDATES_16 = (
    TileConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=4),
    TileConfig(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3),
    TileConfig(block_m=128, block_n=128, block_k=128, group_m=8, num_warps=8, num_stages=3),
    TileConfig(block_m=64, block_n=256, block_k=64, group_m=8, num_warps=4, num_stages=4),
    TileConfig(block_m=128, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=4),
)
_CUDA_CANDIDATES_32 = (
    TileConfig(block_m=128, block_n=128, block_k=32, group_m=8, num_warps=8, num_stages=3),
    TileConfig(block_m=64, block_n=128, block_k=32, group_m=8, num_warps=4, num_stages=3),
)


def cuda_candidates(dtype: torch.dtype) -> Tuple[TileConfig, ...]:
    return _CUDA_CANDIDATES_32 if dtype == torch.float32 else _CUDA_CANDIDATES_16


def _precision(dtype: torch.dtype, interpreted: bool) -> str:
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    return "ieee" if interpreted else "tf32x3"  # 3xTF32: ~fp32 accuracy on tensor cores


def _launch(kernel, cfg: TileConfig, mode: int, h, w, ids, *, out=None, stat0=None, stat1=None, tgt=None,
            lse=None, gscale=None, ent=None, v_start: int = 0, inv_temp: float = 1.0):
    interp = is_interpreted(kernel)
    if ent is not None and (stat0 is None or ent.stride(0) != stat0.stride(0)):
        raise ValueError("the tile-entropy buffer must have the tile statistics' row stride")
    m, k = h.shape
    vn = w.shape[0]
    any_t = tgt if tgt is not None else (lse if lse is not None else ids)
    out_t = out if out is not None else any_t
    s0 = stat0 if stat0 is not None else any_t
    s1 = stat1 if stat1 is not None else any_t
    grid = (cdiv(m, cfg.block_m) * cdiv(vn, cfg.block_n),)
    kernel[grid](
        h, w, ids, out_t, s0, s1,
        tgt if tgt is not None else any_t,
        lse if lse is not None else any_t,
        gscale if gscale is not None else any_t,
        ent if ent is not None else any_t,
        m, vn, k, v_start,
        h.stride(0), w.stride(0),
        out.stride(0) if out is not None else 0,
        stat0.stride(0) if stat0 is not None else 0,
        float(inv_temp),
        MODE=mode,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        EVEN_K=(k % cfg.block_k == 0),
        UPCAST=(interp and w.dtype != torch.float32),
        PRECISION=_precision(w.dtype, interp),
        ENTROPY=ent is not None,
        **cfg.launch_options(interp),
    )


def _bucket(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


def _select_config(mode: int, kernel, h, w, ids, rows: int, cols: int, inv_temp: float, opts: _Options) -> TileConfig:
    if opts.config is not None:
        return opts.config
    if is_interpreted(kernel):
        return INTERPRETER_CONFIG
    from ._logprobs_triton import MODE_DLOGITS, MODE_LSE

    dev = h.device
    key = ("logits_tile", mode, str(w.dtype), h.shape[1], _bucket(rows), _bucket(cols),
           torch.cuda.get_device_capability(dev))
    hs, ws, ids_s = h[:rows], w[:cols], ids[:rows]

    def launch(cfg: TileConfig) -> None:
        nt = cdiv(cols, cfg.block_n)
        tgt = torch.empty(rows, dtype=torch.float32, device=dev)
        if mode == MODE_LSE:
            st = torch.empty(rows, nt, dtype=torch.float32, device=dev)
            _launch(kernel, cfg, mode, hs, ws, ids_s, stat0=st, tgt=tgt, inv_temp=inv_temp)
        elif mode == MODE_DLOGITS:
            d = torch.empty(rows, cols, dtype=w.dtype, device=dev)
            z = torch.zeros(rows, dtype=torch.float32, device=dev)
            _launch(kernel, cfg, mode, hs, ws, ids_s, out=d, lse=z + 30.0, gscale=z, inv_temp=inv_temp)
        else:
            p = torch.empty(rows, nt * cfg.block_n, dtype=w.dtype, device=dev)
            st0 = torch.empty(rows, nt, dtype=torch.float32, device=dev)
            st1 = torch.empty_like(st0)
            _launch(kernel, cfg, mode, hs, ws, ids_s, out=p, stat0=st0, stat1=st1, tgt=tgt, inv_temp=inv_temp)

    return pick_config(key, cuda_candidates(w.dtype), launch)


def combine_tile_entropies(tile_lse: torch.Tensor, tile_entropy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lse, entropy) per row of a softmax split into groups of columns (tiles), from each group's
    log-sum-exp and the entropy of its own softmax ([rows, groups] each): the chain rule of entropy,
    ``H = sum_t w_t (H_t - log w_t)``, ``w_t = exp(lse_t - lse)``; every term is >= 0."""
    lse = torch.logsumexp(tile_lse, dim=1)
    gap = lse[:, None] - tile_lse  # -log w_t >= 0
    return lse, (torch.exp(-gap) * (tile_entropy + gap)).sum(dim=1)


def _forward_lse(kernel, h, w, ids, inv_temp: float, opts: _Options, with_entropy: bool = False):
    """log-probs, log-sum-exp (and entropies) without any [tokens, vocab] buffer (no-grad /
    weight-grad-only path)."""
    from ._logprobs_triton import MODE_LSE

    n = h.shape[0]
    v = w.shape[0]
    dev = h.device
    # Chunk size bounded by the partial-LSE buffer; the config is tuned on the first chunk.
    buffers = 2 if with_entropy else 1  # the tile entropies share the bound with the tile lse's
    rows_guess = max(1, min(n, opts.lse_buffer_bytes // (4 * buffers * cdiv(v, 64))))
    cfg = _select_config(MODE_LSE, kernel, h, w, ids, rows_guess, v, inv_temp, opts)
    tiles = cdiv(v, cfg.block_n)
    rows = max(1, min(n, opts.lse_buffer_bytes // (4 * buffers * tiles)))
    if rows < n and rows > cfg.block_m:
        rows = rows // cfg.block_m * cfg.block_m
    part = torch.empty(rows, tiles, dtype=torch.float32, device=dev)
    part_ent = torch.empty_like(part) if with_entropy else None
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    entropy = torch.empty(n, dtype=torch.float32, device=dev) if with_entropy else None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        nr = r1 - r0
        tgt = torch.full((nr,), float("nan"), dtype=torch.float32, device=dev)
        ent_c = part_ent[:nr] if with_entropy else None
        _launch(kernel, cfg, MODE_LSE, h[r0:r1], w, ids[r0:r1], stat0=part[:nr], tgt=tgt, ent=ent_c,
                inv_temp=inv_temp)
        if with_entropy:
            lse_c, entropy[r0:r1] = combine_tile_entropies(part[:nr], ent_c)
        else:
            lse_c = torch.logsumexp(part[:nr], dim=1)
        lse[r0:r1] = lse_c
        logp[r0:r1] = tgt - lse_c
    return logp, lse, entropy


def _forward_with_grad_basis(kernel, h, w, ids, inv_temp: float, opts: _Options, with_entropy: bool = False):
    """log-probs, log-sum-exp, C = sum_v p_v (W[t] - W[v]) (so that dlogp/dh = C / T), and the
    entropies when asked (from the same tiles: no extra GEMM)."""
    from ._logprobs_triton import MODE_PROBS

    n, hdim = h.shape
    v = w.shape[0]
    dev = h.device
    nc = min(n, opts.token_chunk)
    vc = min(v, opts.vocab_chunk)
    cfg = _select_config(MODE_PROBS, kernel, h, w, ids, nc, vc, inv_temp, opts)
    bn = cfg.block_n
    tiles_max = cdiv(vc, bn)
    p_buf = torch.empty(nc, tiles_max * bn, dtype=w.dtype, device=dev)
    tmax_buf = torch.empty(nc, tiles_max, dtype=torch.float32, device=dev)
    tsum_buf = torch.empty_like(tmax_buf)
    tent_buf = torch.empty_like(tmax_buf) if with_entropy else None
    entropy = torch.empty(n, dtype=torch.float32, device=dev) if with_entropy else None
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    lse_all = torch.empty(n, dtype=torch.float32, device=dev)
    basis = torch.empty(n, hdim, dtype=w.dtype, device=dev)
    for r0 in range(0, n, nc):
        r1 = min(n, r0 + nc)
        nr = r1 - r0
        hc, idc = h[r0:r1], ids[r0:r1]
        m = torch.full((nr,), float("-inf"), dtype=torch.float32, device=dev)
        l = torch.zeros(nr, dtype=torch.float32, device=dev)
        acc = torch.zeros(nr, hdim, dtype=torch.float32, device=dev)  # sum_{v != t} exp(s_v - m) W[v]
        tgt = torch.full((nr,), float("nan"), dtype=torch.float32, device=dev)
        chunk_lse, chunk_ent = [], []  # per vocab chunk, for the entropies
        for v0 in range(0, v, vc):
            v1 = min(v, v0 + vc)
            vl = v1 - v0
            nt = cdiv(vl, bn)
            p = p_buf[:nr, : nt * bn]
            tmax = tmax_buf[:nr, :nt]
            tsum = tsum_buf[:nr, :nt]
            tent = tent_buf[:nr, :nt] if with_entropy else None
            wc = w[v0:v1]
            _launch(kernel, cfg, MODE_PROBS, hc, wc, idc, out=p, stat0=tmax, stat1=tsum, tgt=tgt, ent=tent,
                    v_start=v0, inv_temp=inv_temp)
            if with_entropy:
                lse_v, ent_v = combine_tile_entropies(tmax + torch.log(tsum), tent)
                chunk_lse.append(lse_v)
                chunk_ent.append(ent_v)
            m_new = torch.maximum(m, tmax.amax(dim=1))
            scale = torch.exp(tmax - m_new[:, None])  # [nr, nt]
            alpha = torch.exp(m - m_new)  # 0 on the first chunk
            l = l * alpha + (tsum * scale).sum(dim=1)
            p.unflatten(1, (nt, bn)).mul_(scale[:, :, None])  # every tile now relative to m_new
            pw = mm_fp32_out(p[:, :vl], wc)
            if pw.dtype == torch.float32:  # acc <- pw + acc * alpha, one pass, pw's memory reused
                acc = pw.addcmul_(acc, alpha[:, None])
            else:
                acc.mul_(alpha[:, None]).add_(pw)
            del pw
            m = m_new
        lse = m + torch.log(l)
        lp = tgt - lse
        one_minus_pt = (-torch.expm1(lp)).clamp_(min=0.0)
        acc.div_(l[:, None]).neg_()  # -sum_{v != t} p_v W[v]
        # + (1 - p_t) W[t]; ids clamped only so that an invalid id (NaN log-prob) cannot fault the gather
        acc.addcmul_(w[idc.clamp(0, v - 1)], one_minus_pt[:, None])
        basis[r0:r1].copy_(acc)
        logp[r0:r1] = lp
        lse_all[r0:r1] = lse
        if with_entropy:
            entropy[r0:r1] = combine_tile_entropies(torch.stack(chunk_lse, 1), torch.stack(chunk_ent, 1))[1]
        del acc
    return logp, lse_all, basis, entropy


def _backward_weight(kernel, h, w, ids, lse, gscale, inv_temp: float, opts: _Options) -> torch.Tensor:
    """grad_W = D.T @ h with D = g/T (onehot - p), recomputed per vocab chunk; D bounded by chunk_bytes."""
    from ._logprobs_triton import MODE_DLOGITS

    n, hdim = h.shape
    v = w.shape[0]
    dev = h.device
    esize = w.element_size()
    dw = torch.empty_like(w)
    vw = (opts.chunk_bytes // max(1, n * esize)) // 128 * 128
    if vw >= min(v, 512):  # one token chunk: D.T @ h reduces over all tokens inside one GEMM
        vw = min(v, vw)
        rows = n
    else:  # very many tokens: fixed vocab chunk, token chunks, fp32 accumulator [vw, H]
        vw = min(v, 1024)
        rows = max(1, opts.chunk_bytes // (vw * esize))
    cfg = _select_config(MODE_DLOGITS, kernel, h, w, ids, rows, vw, inv_temp, opts)
    d_buf = torch.empty(rows, vw, dtype=w.dtype, device=dev)
    for v0 in range(0, v, vw):
        v1 = min(v, v0 + vw)
        vl = v1 - v0
        wc = w[v0:v1]
        if rows >= n:
            d = d_buf[:n, :vl]
            _launch(kernel, cfg, MODE_DLOGITS, h, wc, ids, out=d, lse=lse, gscale=gscale,
                    v_start=v0, inv_temp=inv_temp)
            torch.mm(d.t(), h, out=dw[v0:v1])
        else:
            acc = torch.zeros(vl, hdim, dtype=torch.float32, device=dev)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                d = d_buf[: r1 - r0, :vl]
                _launch(kernel, cfg, MODE_DLOGITS, h[r0:r1], wc, ids[r0:r1], out=d, lse=lse[r0:r1],
                        gscale=gscale[r0:r1], v_start=v0, inv_temp=inv_temp)
                acc.add_(mm_fp32_out(d.t(), h[r0:r1]))
            dw[v0:v1].copy_(acc)
    return dw


def _tile_kernel_fn():
    from ._logprobs_triton import logits_tile_kernel

    return logits_tile_kernel


class _TritonSelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, ids, temperature, opts, need_h, need_w, with_entropy):
        # need_h / need_w come from the caller: inside forward grad mode is always off, and
        # ctx.needs_input_grad is True under torch.no_grad() too, which would make a no-grad
        # forward pay for the gradient basis.
        kernel = kernel_for(_tile_kernel_fn(), h.device)
        inv_t = 1.0 / temperature
        basis = None
        if need_h:
            logp, lse, basis, entropy = _forward_with_grad_basis(kernel, h, weight, ids, inv_t, opts, with_entropy)
        else:
            logp, lse, entropy = _forward_lse(kernel, h, weight, ids, inv_t, opts, with_entropy)
        ctx.save_for_backward(h if need_w else None, weight if need_w else None, ids, lse if need_w else None, basis)
        ctx.inv_t = inv_t
        ctx.opts = opts
        ctx.kernel = kernel
        entropy = logp.new_empty(0) if entropy is None else entropy
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad, _grad_entropy):
        h, weight, ids, lse, basis = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gscale = grad.float() * ctx.inv_t
        dh = dw = None
        if need_w:
            dw = _backward_weight(ctx.kernel, h, weight, ids, lse, gscale, ctx.inv_t, ctx.opts)
        if need_h:
            # grad_hidden = C * g / T, written over C (C is not needed afterwards; a second backward
            # through this graph fails autograd's saved-tensor version check instead of going wrong).
            dh = basis.mul_(gscale[:, None])
        return dh, dw, None, None, None, None, None, None


def selective_log_softmax_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    token_chunk: int = 2048,
    vocab_chunk: int = 16384,
    chunk_bytes: int = 128 << 20,
    lse_buffer_bytes: int = 32 << 20,
    config: Optional[TileConfig] = None,
    return_entropy: bool = False,
):
    """Triton log-probs of ``token_ids`` under ``softmax(hidden @ weight.T / temperature)``; float32.

    ``return_entropy``: return ``(logp, entropy)``, the entropy of that softmax per token (float32,
    no gradient), from the same logit tiles as the log-probs (no extra GEMM).

    Never materializes ``[tokens, vocab]`` logits (see the module docstring for the algorithm and
    the memory bound). Works on CUDA (compiled) and on CPU (the Triton interpreter; slow, for tests).

    Gradients: ``hidden`` whenever it requires grad; ``weight`` only when ``weight.requires_grad``
    (otherwise no weight gradient is computed or allocated). Accumulation is fp32 throughout;
    hidden and weight may be bf16, fp16 or fp32 (hidden is cast to weight's dtype for the GEMMs,
    its gradient returned in its own dtype). Token ids must lie in ``[0, vocab)``; an id outside it
    yields NaN for that token.

    Args:
        token_chunk, vocab_chunk: chunk shape of the gradient-basis pass (temporary
            ``token_chunk x vocab_chunk`` buffer in the weight dtype).
        chunk_bytes: bound on the ``D`` buffer of the weight-gradient pass.
        lse_buffer_bytes: bound on the per-tile log-sum-exp buffer of the no-grad pass.
        config: a fixed :class:`TileConfig` (tile sizes, warps, stages) instead of the tuned one.
    """
    _check_inputs(hidden, weight, token_ids, temperature)
    for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk),
                        ("chunk_bytes", chunk_bytes), ("lse_buffer_bytes", lse_buffer_bytes)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    if h.stride(-1) != 1:
        h = h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    ids = token_ids.reshape(-1).to(torch.int64).contiguous()
    if h.shape[0] == 0:
        return _with_entropy(_empty_result(h, token_ids), return_entropy)
    opts = _Options(int(token_chunk), int(vocab_chunk), int(chunk_bytes), int(lse_buffer_bytes), config)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and h.requires_grad, grad_on and w.requires_grad
    out, entropy = _TritonSelectiveLogSoftmax.apply(h, w, ids, float(temperature), opts, need_h, need_w,
                                                    bool(return_entropy))
    out = out.reshape(token_ids.shape)
    return (out, entropy.reshape(token_ids.shape)) if return_entropy else out

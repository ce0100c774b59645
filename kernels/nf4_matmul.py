"""``x @ W.T`` for a bitsandbytes NF4 weight, dequantized in registers: no 16-bit copy of W is written.

For a batch of rows (the rollout engine's decode batch), ``bitsandbytes.matmul_4bit`` dequantizes the
whole weight into a 16-bit temporary and multiplies that: per call it writes and reads 4 bytes per
weight on top of the half byte of codes, more traffic than a 16-bit weight costs. This kernel reads
the codes and the (double-quantized) scales and dequantizes tiles in registers.

- :func:`nf4_matmul` (``compilepass::nf4_matmul``, a custom op: eager, inside ``torch.compile``, inside
  CUDA graphs): CUDA tensors run the compiled Triton kernel, CPU tensors the Triton interpreter.
- :func:`nf4_matmul_reference`: the plain PyTorch definition (dequantize, then matmul) it is tested
  against, itself tested against ``bitsandbytes.functional.dequantize_4bit``.
- :func:`nf4_operands`: the tensors of a ``Params4bit`` weight and its ``quant_state``, in the
  op's argument order; ``supports`` says whether a weight's layout is one the kernel reads.

The result is ``x.dtype``; accumulation is fp32. Batches of more than ``DEQUANT_ROWS`` rows (prefill)
dequantize W once into a 16-bit temporary (``nf4_dequant_kernel``) and multiply with cuBLAS, as
bitsandbytes does; decode batches dequantize in registers. On the H200 (session 10) the first
version, one gathered scale per element and every tile dequantized once per M tile, was 5x slower
than bitsandbytes in the decode step and 12x in prefill; this one (one scale per row and block on
K-aligned weights, the prefill path above) is not yet measured. The engine uses it only when asked
(``COMPILEPASS_NF4_MATMUL=triton``, see ``standby/rollout/linear4bit.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton_support import cdiv, is_interpreted, kernel_for

__all__ = ["nf4_matmul", "nf4_matmul_reference", "nf4_operands", "supports", "split_k_for", "DEQUANT_ROWS"]

#: Above this many rows the op dequantizes W once and runs a GEMM (module doc).
DEQUANT_ROWS = 64


def supports(weight) -> bool:
    """A bitsandbytes NF4 weight packed in uint8 storage (not ``quant_storage=bf16`` and the like,
    nor bitsandbytes' CPU re-packing), with an even input size and an even block size (both
    nibbles of a byte then share one scale)."""
    qs = getattr(weight, "quant_state", None)
    if qs is None or getattr(qs, "quant_type", None) != "nf4" or len(qs.shape) != 2:
        return False
    if getattr(weight, "dtype", None) != torch.uint8 or getattr(qs, "packing_format_for_cpu", False):
        return False
    return qs.shape[1] % 2 == 0 and qs.blocksize % 2 == 0 and (not qs.nested or qs.state2.blocksize > 0)


def nf4_operands(weight) -> tuple:
    """(packed, absmax, absmax2, code2, code, offset, out_features, blocksize, blocksize2) of a
    ``Params4bit``: what :func:`nf4_matmul` takes after ``x``."""
    qs = weight.quant_state
    if qs.nested:
        s2 = qs.state2
        return (weight.data.view(-1), qs.absmax, s2.absmax, s2.code, qs.code, qs.offset.reshape(()).float(),
                int(qs.shape[0]), int(qs.blocksize), int(s2.blocksize))
    return (weight.data.view(-1), qs.absmax.float(), None, None, qs.code, None, int(qs.shape[0]),
            int(qs.blocksize), 0)


def _scales(absmax, absmax2, code2, offset, blocksize2: int) -> torch.Tensor:
    if absmax2 is None:
        return absmax.float()
    return code2[absmax.long()] * absmax2.repeat_interleave(blocksize2)[: absmax.numel()] + offset


def nf4_matmul_reference(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
                         code2: Optional[torch.Tensor], code: torch.Tensor, offset: Optional[torch.Tensor],
                         out_features: int, blocksize: int, blocksize2: int) -> torch.Tensor:
    """Dequantize W [out_features, K] in fp32, then ``x @ W.T`` in fp32, returned in x's dtype."""
    K = x.shape[-1]
    idx = torch.stack([(packed >> 4).long(), (packed & 15).long()], 1).view(-1)
    scales = _scales(absmax, absmax2, code2, offset, blocksize2).repeat_interleave(blocksize)[: idx.numel()]
    w = code.float()[idx] * scales  # the last block may be short: N * K need not divide by blocksize
    return (x.float() @ w.view(out_features, K).t()).to(x.dtype)


def split_k_for(m: int, n: int, kh: int, block_m: int, block_n: int, block_kh: int, sms: int = 132) -> int:
    """K splits so that the (M tiles x N tiles x splits) grid gives every SM about two programs, each
    split at least 4 blocks of packed columns."""
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    most = max(1, kh // (4 * block_kh))
    return max(1, min(most, cdiv(2 * sms, tiles)))


def _kernel_fn():
    from ._nf4_triton import nf4_matmul_kernel

    return nf4_matmul_kernel


def _dequant_fn():
    from ._nf4_triton import nf4_dequant_kernel

    return nf4_dequant_kernel


def _aligned_block_kh(k: int, blocksize: int) -> int:
    """``BLOCKSIZE // 2`` when the kernel's ALIGNED path applies to K (0 when it does not)."""
    half = blocksize // 2
    ok = k % blocksize == 0 and 16 <= half <= 128 and half & (half - 1) == 0
    return half if ok else 0


def _scale_pointers(absmax, absmax2, code2, code, offset) -> tuple:
    """(absmax, absmax2, code2, code, offset) as both kernels take them: the non-nested layout's unused
    pointers (absmax2, code2, offset) filled with ``code``."""
    if absmax2 is not None:
        return absmax, absmax2, code2, code, offset
    return absmax, code, code, code, code


def _dequantize(packed, absmax, absmax2, code2, code, offset, out_features: int, k: int, blocksize: int,
                blocksize2: int, dtype: torch.dtype) -> torch.Tensor:
    """W [out_features, k] in ``dtype`` from its packed codes (``nf4_dequant_kernel``)."""
    kernel = kernel_for(_dequant_fn(), packed.device)
    interp = is_interpreted(kernel)
    out = torch.empty(out_features * k, dtype=dtype, device=packed.device)
    nbytes = packed.numel()
    block = 256 if interp else 1024
    kernel[(cdiv(nbytes, block),)](packed, *_scale_pointers(absmax, absmax2, code2, code, offset), out, nbytes,
                                   BLOCK=block, BLOCKSIZE=blocksize, BLOCKSIZE2=max(1, blocksize2),
                                   NESTED=absmax2 is not None,
                                   **({} if interp else {"num_warps": 4}))
    return out.view(out_features, k)


@torch.library.custom_op("compilepass::nf4_matmul", mutates_args=())
def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
               code2: Optional[torch.Tensor], code: torch.Tensor, offset: Optional[torch.Tensor], out_features: int,
               blocksize: int, blocksize2: int) -> torch.Tensor:
    """``x`` [..., K] @ dequant(W).T -> [..., out_features] in x's dtype (see the module docstring)."""
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], out_features
    if M == 0:
        return x.new_empty(*lead, N)
    if M > DEQUANT_ROWS:  # prefill: one dequantization, then cuBLAS (fp32 accumulation)
        w = _dequantize(packed, absmax, absmax2, code2, code, offset, N, K, blocksize, blocksize2, x2.dtype)
        return torch.mm(x2, w.t()).reshape(*lead, N)
    kernel = kernel_for(_kernel_fn(), x.device)
    interp = is_interpreted(kernel)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n, block_kh = (32, 32) if interp else (64, 64)
    aligned_kh = _aligned_block_kh(K, blocksize)
    if aligned_kh:
        block_kh = aligned_kh
    kh = K // 2
    if interp:
        splits = 2 if kh >= 2 * block_kh else 1
    else:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        splits = split_k_for(M, N, kh, block_m, block_n, block_kh, sms)
    kh_split = cdiv(cdiv(kh, splits), block_kh) * block_kh
    splits = cdiv(kh, kh_split)
    part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    nested = absmax2 is not None
    kernel[(cdiv(M, block_m), cdiv(N, block_n), splits)](
        x2, packed, *_scale_pointers(absmax, absmax2, code2, code, offset), part,
        M, N, K, kh_split, x2.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KH=block_kh, BLOCKSIZE=blocksize,
        BLOCKSIZE2=max(1, blocksize2), NESTED=nested, UPCAST=(interp or x.dtype == torch.float32),
        PRECISION="ieee" if interp else "tf32x3",  # fp32 inputs: ~fp32 on tensor cores, not plain TF32
        ALIGNED=bool(aligned_kh),
        **({} if interp else {"num_warps": 4, "num_stages": 3}),
    )
    y = part[0] if splits == 1 else part.sum(0)
    return y.to(x.dtype).reshape(*lead, N)


@nf4_matmul.register_fake
def _(x, packed, absmax, absmax2, code2, code, offset, out_features, blocksize, blocksize2):
    return x.new_empty(*x.shape[:-1], out_features)

"""The native engine's matmul for a 4-bit base layer (QLoRA): the packed NF4 weight as it is.

:func:`linear_4bit` is what the decoder calls for a projection whose base layer is a bitsandbytes
``Linear4bit`` (under peft, the LoRA layer around one): ``bitsandbytes.matmul_4bit`` over the
layer's own ``Params4bit`` and ``quant_state`` (the trainer's copy: nothing is dequantized and kept;
without autograd, bitsandbytes 0.50 runs its ``gemm_4bit`` op, which reads the codes and the
double-quantized scales directly), then the active LoRA adapters read from the peft module at the
call, as :class:`~compilepass.standby.rollout.fused.FusedLinear` does for 16-bit bases. The input
is cast to the layer's compute dtype and the result back to the input's dtype, as
``Linear4bit.forward`` does; unlike that forward it never repacks the weight (on CPUs with
AVX512-BF16, bitsandbytes' eval-mode forward rewrites ``weight.data`` into a CPU-only layout).

This is the reference path (CPU-tested against the dequantized model). On CUDA the same call runs
inside the engine's graphs unmeasured. ``COMPILEPASS_NF4_MATMUL=triton`` runs the base matmul
through :func:`compilepass.kernels.nf4_matmul.nf4_matmul` instead (the codes dequantized in
registers, no 16-bit temporary of the weight; CPU-tested in the Triton interpreter, compiled for
sm90 in the tests, not yet measured on a GPU); the default stays bitsandbytes until it is.
"""

from __future__ import annotations

import os

import torch

from compilepass.core.errors import ConfigError
from compilepass.core.quantize import is_4bit_linear
from compilepass.kernels.nf4_matmul import nf4_matmul, nf4_operands
from compilepass.kernels.nf4_matmul import supports as nf4_supports
from compilepass.standby.rollout.fused import _is_lora_layer, _lora_input, _lora_terms

__all__ = ["base_is_4bit", "linear_4bit", "model_has_4bit"]


def _base(module):
    return module.base_layer if _is_lora_layer(module) else module


def base_is_4bit(module) -> bool:
    """Whether ``module`` (a Linear or a peft LoRA layer around one) has a 4-bit base."""
    return is_4bit_linear(_base(module))


def model_has_4bit(model) -> bool:
    return any(is_4bit_linear(m) for m in model.modules())


#: ``COMPILEPASS_NF4_MATMUL``: "bnb" (default, ``bitsandbytes.matmul_4bit``) or "triton" (ours)
MATMUL_ENV = "COMPILEPASS_NF4_MATMUL"


def matmul_backend() -> str:
    value = os.environ.get(MATMUL_ENV, "bnb")
    if value not in ("bnb", "triton"):
        raise ConfigError(f"{MATMUL_ENV} must be 'bnb' or 'triton', got {value!r}")
    return value


def linear_4bit(module, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``module(x)`` for a 4-bit base (see the module docstring): x [..., in] -> [..., out].
    ``backend``: "bnb" or "triton" (the decoder passes the one it was built with); None reads
    ``COMPILEPASS_NF4_MATMUL`` now."""
    backend = matmul_backend() if backend is None else backend
    base = _base(module)
    weight = base.weight
    compute = base.compute_dtype or x.dtype
    bias = base.bias.to(compute) if base.bias is not None else None
    if backend == "triton" and nf4_supports(weight):
        y = nf4_matmul(x.to(compute), *nf4_operands(weight))
        y = (y + bias if bias is not None else y).to(x.dtype)
    else:
        import bitsandbytes as bnb

        y = bnb.matmul_4bit(x.to(compute), weight, quant_state=weight.quant_state, bias=bias).to(x.dtype)
    for A, B, dropout, scaling in _lora_terms(module):
        delta = B(A(dropout(_lora_input(module, x, A.weight.dtype)))) * scaling
        y = y + delta.to(y.dtype)
    return y

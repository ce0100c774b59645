"""Two ways the training step's activation memory stops growing with large per-token factors.

**Tiled MLP** (:func:`tile_mlp`). In a checkpointed decoder layer, the backward pass recomputes
the layer and holds its MLP's intermediates for every token at once: gate, up, act(gate) and
their product are ``tokens x intermediate`` each (25,600 wide for a 32B model: 50 KB per token
apiece in bf16), several times the checkpointed hidden state itself. :class:`TiledMLPFunction`
runs the MLP over ``chunk_tokens`` tokens at a time: the forward pass keeps only its input; the
backward pass recomputes one chunk with gradients on, back-propagates it (the LoRA weights' grads
accumulate chunk by chunk) and frees it before the next, so the intermediates never exceed one
chunk. Without autograd (``torch.no_grad``: a reentrant checkpoint's first pass, a long prefill)
the chunks are simply run one after the other; inputs of at most ``chunk_tokens`` tokens (every
decode step) take the MLP's own forward unchanged.

**LoRA compute in the model's dtype** (:func:`lora_mixed_precision`). peft keeps LoRA weights in
float32 for a bf16 model and casts every LoRA layer's *input* to float32 before ``lora_A``; for
``down_proj`` that is a ``tokens x intermediate`` float32 copy (3 GiB at 32k tokens). Inside this
context, autocast runs the LoRA matmuls in the model's dtype (the float32 weights are cast, the
weights and their gradients stay float32: mixed precision) and peft's input cast is off. Enter it
around both the forward pass and ``backward()``: checkpointed layers are recomputed during
backward, and they must see the same setting.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["TiledMLPFunction", "tile_mlp", "untile_mlp", "lora_mixed_precision", "lora_needs_mixed_precision"]


class TiledMLPFunction(torch.autograd.Function):
    """``y = mlp(x)`` computed over token chunks; see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_fn, chunk_tokens: int) -> torch.Tensor:
        ctx.forward_fn, ctx.chunk_tokens = forward_fn, chunk_tokens
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([forward_fn(part) for part in flat.split(chunk_tokens)])
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        flat = x.detach().reshape(-1, x.shape[-1])
        g_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat)
        n = ctx.chunk_tokens
        with torch.enable_grad(), _autocast(x.device.type, ctx.autocast):
            for start in range(0, flat.shape[0], n):
                part = flat[start:start + n].detach().requires_grad_(True)
                y = ctx.forward_fn(part)
                # parameter grads (the LoRA weights) accumulate in .grad, the chunk's in part.grad
                torch.autograd.backward(y, g_flat[start:start + n])
                grad_x[start:start + n] = part.grad
                del y, part
        return grad_x.view_as(x), None, None


def _autocast_state(device_type: str):
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast(device_type: str, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


class _TiledForward:
    """The replacement ``forward`` of one MLP module (kept as an attribute so it can be undone)."""

    def __init__(self, module: torch.nn.Module, chunk_tokens: int):
        self.original = module.forward
        self.chunk_tokens = chunk_tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if tokens <= self.chunk_tokens:
            return self.original(x)
        if torch.is_grad_enabled():
            return TiledMLPFunction.apply(x, self.original, self.chunk_tokens)
        # no autograd (a reentrant checkpoint's first pass, a long prefill): chunks bound the peak too
        flat = x.reshape(-1, x.shape[-1])
        out = torch.cat([self.original(part) for part in flat.split(self.chunk_tokens)])
        return out.view(*x.shape[:-1], out.shape[-1])


def _decoder_mlps(causal_lm) -> Iterator[torch.nn.Module]:
    inner = causal_lm.get_base_model().model if hasattr(causal_lm, "get_base_model") else causal_lm.model
    for layer in inner.layers:
        yield layer.mlp


def tile_mlp(causal_lm, chunk_tokens: int = 4096) -> int:
    """Run every decoder layer's MLP of ``causal_lm`` (an HF causal LM or a peft model) over
    ``chunk_tokens`` tokens at a time when gradients are on. Returns the number of MLPs tiled."""
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    n = 0
    for mlp in _decoder_mlps(causal_lm):
        if isinstance(mlp.forward, _TiledForward):
            mlp.forward.chunk_tokens = int(chunk_tokens)
        else:
            mlp.forward = _TiledForward(mlp, int(chunk_tokens))
        n += 1
    return n


def untile_mlp(causal_lm) -> None:
    for mlp in _decoder_mlps(causal_lm):
        if isinstance(mlp.forward, _TiledForward):
            mlp.forward = mlp.forward.original


def lora_needs_mixed_precision(model) -> bool:
    """True when ``model``'s frozen weights are half precision and a trainable one is float32."""
    half = {torch.bfloat16, torch.float16}
    frozen_half = trainable_fp32 = False
    for p in model.parameters():
        if p.requires_grad:
            trainable_fp32 = trainable_fp32 or p.dtype == torch.float32
        else:
            frozen_half = frozen_half or p.dtype in half
        if frozen_half and trainable_fp32:
            return True
    return False


@contextlib.contextmanager
def lora_mixed_precision(model, enabled: bool = True):
    """Autocast to the frozen weights' dtype with peft's input cast off (see the module docstring);
    a no-op unless :func:`lora_needs_mixed_precision` (e.g. float32 models on CPU)."""
    if not enabled or not lora_needs_mixed_precision(model):
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    p = next(p for p in model.parameters() if not p.requires_grad and p.dtype in (torch.bfloat16, torch.float16))
    with torch.autocast(p.device.type, dtype=p.dtype), disable_input_dtype_casting(model):
        yield

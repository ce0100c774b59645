"""4-bit (QLoRA) test models and their dequantized float twins (built only in the tests)."""

from __future__ import annotations

import copy

import torch

from compilepass.core.quantize import is_4bit_linear, quantize_linears


def quantized_tiny(name: str = "tiny", lora: bool = True, seed: int = 0, dtype=torch.float32):
    """``make_model(name)``'s weights quantized to NF4 (double quantization), with a random-B LoRA
    adapter through peft's 4-bit LoRA layers when ``lora``."""
    from model_helpers import make_model

    from compilepass.core.models import add_lora

    model = make_model(name, seed=seed).to(dtype)
    quantize_linears(model, dtype)
    if lora:
        model = add_lora(model, rank=4, alpha=8, seed=seed, init_random=True, init_std=0.1)
    return model


def dequantized_twin(model):
    """A float copy of ``model`` (peft-wrapped or not) whose every 4-bit base layer is a plain
    ``torch.nn.Linear`` holding ``dequantize_4bit`` of that layer's codes; LoRA tensors copied."""
    import bitsandbytes.functional as bf

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if not is_4bit_linear(module):
            continue
        w = bf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        lin = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=w.dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if module.bias is not None:
                lin.bias.copy_(module.bias)
        lin.weight.requires_grad_(False)
        if lin.bias is not None:
            lin.bias.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, child, lin)
    return twin

"""The trainer's LoRA adapter in vLLM's LoRA buffers: which peft layers hold it, and the slots it is
copied into device-to-device before each generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from compilepass.core.shapes import causal_lm_of

#: vLLM's accepted ``max_lora_rank`` values (``MaxLoRARanks`` in vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_ID = 1
LORA_NAME = "compilepass-policy"


@dataclass
class LoraSlice:
    a_src: torch.Tensor  # the trainer's lora_A weight [r, in] (a Parameter)
    b_src: torch.Tensor  # lora_B weight [out, r]
    scaling: float
    a_dst: torch.Tensor  # vLLM's lora_a_stacked[i]: [max_loras, 1, max_rank, in]
    b_dst: torch.Tensor  # lora_b_stacked[i]: [max_loras, 1, out, max_rank]


def peft_lora_layers(model) -> dict[str, Any]:
    """``{clean module name (no peft prefix): peft LoRA layer}`` for the active adapter."""
    out = {}
    causal_lm = causal_lm_of(model)
    for name, module in causal_lm.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and len(getattr(module, "lora_A", {})):
            out[name] = module
    return out


def peft_adapter_info(model) -> Optional[dict]:
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return None
    name = getattr(model, "active_adapter", None) or next(iter(cfg))
    if isinstance(name, (list, tuple)):
        name = name[0]
    c = cfg[name]
    return {"name": name, "rank": int(c.r), "alpha": float(c.lora_alpha), "targets": c.target_modules}

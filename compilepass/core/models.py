"""Building models: a preset with random weights, a local Hugging Face directory or a cached Hub id,
and LoRA wrapping.

``build_model`` builds a preset (:mod:`compilepass.core.shapes`) with random weights or loads a local
Hugging Face directory or a Hub id's snapshot in the local Hugging Face cache (never downloaded);
any causal LM family transformers knows loads (the native engine's families are checked where
the engine is built). ``load_in_4bit=True`` gives it 4-bit NF4 base weights
(:mod:`compilepass.core.quantize`): a directory or Hub id through transformers'
``BitsAndBytesConfig``, a preset quantized after it is built. ``add_lora`` wraps a model with a peft LoRA adapter; the decoder then calls
the LoRA layers themselves, so generation always sees the adapter's current weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from compilepass.core.quantize import bnb_4bit_config, quantize_linears
from compilepass.core.shapes import PRESETS, local_model_path


def build_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    cache_dir: Optional[str] = None,
    load_in_4bit: bool = False,
):
    """A causal LM in eval mode: a preset with random weights (initialized directly on ``device``
    in ``dtype``), a local Hugging Face directory, or a Hub id from the local cache
    (``cache_dir``, else huggingface_hub's; see :func:`~compilepass.core.shapes.local_model_path`).
    ``load_in_4bit``: NF4 double-quantized linear layers computing in ``dtype`` (``lm_head``, the
    embedding and the norms in ``dtype``); a ConfigError (one line) without bitsandbytes."""
    from transformers import AutoModelForCausalLM

    quant = {}
    if load_in_4bit:
        quant = {"quantization_config": bnb_4bit_config(dtype)}  # ConfigError first when bitsandbytes is missing

    name = str(name_or_path)
    if name in PRESETS:
        config = PRESETS[name].to_hf_config(attn_implementation)
        devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.device(device):
            torch.manual_seed(seed)
            model = _call_with_dtype(AutoModelForCausalLM.from_config, config, dtype=dtype,
                                     attn_implementation=attn_implementation)
        if load_in_4bit:
            quantize_linears(model, dtype)
    else:
        path = local_model_path(name, cache_dir)  # ModelNotFoundError (one line) unless it exists here
        model = _call_with_dtype(AutoModelForCausalLM.from_pretrained, path, dtype=dtype, local_files_only=True,
                                 attn_implementation=attn_implementation, device_map=str(torch.device(device)), **quant)
    return model.eval()


def _call_with_dtype(fn, *args, dtype, **kwargs):
    """transformers 5 spells it ``dtype=``; 4.x spelled it ``torch_dtype=``."""
    import transformers

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return fn(*args, **{key: dtype}, **kwargs)


DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(
    model,
    rank: int = 16,
    alpha: int = 32,
    targets: tuple[str, ...] | str = DEFAULT_LORA_TARGETS,
    seed: int = 0,
    init_random: bool = False,
    init_std: float = 0.02,
    dropout: float = 0.0,
):
    """Wrap ``model`` with a peft LoRA adapter (in place; returns the ``PeftModel``).

    peft initializes B to zeros, so the adapter starts as a no-op; ``init_random=True`` draws B from
    N(0, init_std) instead so that tests can see the adapter's effect.
    """
    from peft import LoraConfig, get_peft_model

    modules = targets if isinstance(targets, str) else list(targets)  # a str: peft's "all-linear"
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=dropout,
                        bias="none", task_type="CAUSAL_LM")
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        if init_random:
            generator = torch.Generator().manual_seed(seed + 1)
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    noise = torch.randn(param.shape, generator=generator) * init_std
                    with torch.no_grad():
                        param.copy_(noise.to(param.dtype))
    return peft_model

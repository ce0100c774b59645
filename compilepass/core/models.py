"""Building models: a preset with random weights or a local Hugging Face directory, and LoRA wrapping.

``build_model`` builds a preset (:mod:`compilepass.core.shapes`) with random weights or loads a local
Hugging Face directory. ``add_lora`` wraps a model with a peft LoRA adapter; the decoder then calls
the LoRA layers themselves, so generation always sees the adapter's current weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compilepass.core.shapes import FAMILIES, PRESETS, ModelShape, model_not_found


def build_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """A causal LM in eval mode: a preset with random weights (initialized directly on ``device``
    in ``dtype``), or a local Hugging Face directory."""
    from transformers import AutoModelForCausalLM

    name = str(name_or_path)
    if name in PRESETS:
        config = PRESETS[name].to_hf_config(attn_implementation)
        devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.device(device):
            torch.manual_seed(seed)
            model = _call_with_dtype(AutoModelForCausalLM.from_config, config, dtype=dtype,
                                     attn_implementation=attn_implementation)
    elif (Path(name) / "config.json").is_file():
        model = _call_with_dtype(AutoModelForCausalLM.from_pretrained, name, dtype=dtype,
                                 attn_implementation=attn_implementation, device_map=str(torch.device(device)))
    else:
        raise model_not_found(name)
    if ModelShape.from_hf_config(model.config).family not in FAMILIES:  # pragma: no cover
        raise model_not_found(name)
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
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
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

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
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

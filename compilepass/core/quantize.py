"""4-bit base weights (QLoRA): NF4 with double quantization through bitsandbytes.

One copy of the weights: every quantized ``torch.nn.Linear`` becomes a ``bitsandbytes.nn.Linear4bit``
whose ``Params4bit`` holds the packed NF4 codes (``uint8``, two per byte) and whose ``quant_state``
holds the per-block scales (themselves 8-bit quantized: double quantization). No float copy of those
weights is kept: the trainer's forward, its backward and the native engine's decode all read the
packed codes (``bitsandbytes.matmul_4bit``). The embedding, the norms and ``lm_head`` stay in the
compute dtype (transformers' bitsandbytes integration skips ``lm_head`` too).

- :func:`bnb_4bit_config`: the ``transformers.BitsAndBytesConfig`` a Hugging Face directory or a
  cached Hub id is loaded with (``from_pretrained(..., quantization_config=...)``).
- :func:`quantize_linears`: the same quantization applied to a model already built (a preset's
  random weights): each Linear replaced by a ``Linear4bit`` quantized from its weight, the float
  weight dropped.
- :func:`prepare_4bit_for_training`: peft's ``prepare_model_for_kbit_training`` for our trainer.
- :func:`quant_of`: what a model's base weights are (:data:`NF4_DQ` or None), the tuning
  database's key field (``ModelSignature.quant``).

Missing bitsandbytes is one line (:func:`require_bitsandbytes`, a ConfigError naming the key).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Optional

import torch

from compilepass.core.errors import ConfigError
from compilepass.core.workload_spec import NF4_DQ  # the name the database keys 4-bit entries by

__all__ = ["NF4_DQ", "QUANT_KEY", "bitsandbytes_available", "require_bitsandbytes", "bnb_4bit_config",
           "quantize_linears", "prepare_4bit_for_training", "quant_of", "is_4bit_linear", "SKIP_MODULES"]


#: The config key that asks for it (named in every refusal).
QUANT_KEY = "model.load_in_4bit"

#: Linear layers that are never quantized (the output head: its logits need the full weight).
SKIP_MODULES = ("lm_head",)

_INSTALL = "pip install 'compilepass[qlora]' (bitsandbytes)"


def bitsandbytes_available() -> bool:
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):
        return False


def require_bitsandbytes():
    """The imported ``bitsandbytes`` module, or a one-line ConfigError naming the key."""
    if not bitsandbytes_available():
        raise ConfigError(f"{QUANT_KEY} needs bitsandbytes, which is not installed here: {_INSTALL}")
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001 - a broken install is the same one line
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ConfigError(f"{QUANT_KEY} needs bitsandbytes, which does not import here "
                          f"({type(exc).__name__}: {first}): {_INSTALL}") from None
    return bitsandbytes


def bnb_4bit_config(compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for NF4 with double quantization, ``compute_dtype``
    matmuls (the run's ``model.dtype``: bfloat16 on a GPU, float32 on CPU), ``lm_head`` skipped."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(SKIP_MODULES))


def is_4bit_linear(module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` with its weight quantized (a peft LoRA
    layer around one is not: its ``base_layer`` is). Imports nothing: without bitsandbytes
    imported, no module can be one."""
    bnb = sys.modules.get("bitsandbytes")
    return (bnb is not None and isinstance(module, bnb.nn.Linear4bit)
            and getattr(module.weight, "quant_state", None) is not None)


def quant_of(model) -> Optional[str]:
    """:data:`NF4_DQ` when ``model``'s linear layers hold NF4 double-quantized 4-bit weights, the
    bitsandbytes quant type (``"fp4"``, ``"nf4"`` without double quantization) for other 4-bit
    weights, None for a model without 4-bit weights."""
    for module in model.modules():
        if is_4bit_linear(module):
            state = module.weight.quant_state
            kind = str(getattr(state, "quant_type", "nf4"))
            return NF4_DQ if kind == "nf4" and getattr(state, "nested", False) else kind
    return None


def quantize_linears(model, compute_dtype: torch.dtype, skip: tuple[str, ...] = SKIP_MODULES):
    """Replace every ``torch.nn.Linear`` of ``model`` (but those named in ``skip``) by a
    bitsandbytes ``Linear4bit`` (NF4, double quantization, ``compute_dtype``) quantized from its
    weight on the weight's own device, one layer at a time; the float weight is dropped with the
    old module. Marks the model ``is_loaded_in_4bit`` as transformers does, so that peft wraps
    the layers with its 4-bit LoRA layers. Returns ``model`` (changed in place)."""
    bnb = require_bitsandbytes()
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is torch.nn.Linear and name.rsplit(".", 1)[-1] not in skip]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = linear.weight.device
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                device="meta")
        new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", module=new)
        if linear.bias is not None:
            new.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        new = new.to(device)  # Params4bit quantizes on its move to a device
        new.train(linear.training)
        setattr(parent, child, new)
        del linear, new
    model.is_loaded_in_4bit = True
    return model


def prepare_4bit_for_training(model, upcast_float32: bool = False):
    """peft's ``prepare_model_for_kbit_training`` for the trainer: every base parameter frozen (the
    adapter that peft adds next is what trains). ``upcast_float32=True`` runs peft's own function,
    which also casts every float16 / bfloat16 parameter that is not 4-bit (embedding, norms,
    ``lm_head``) to float32; the trainer does not (as TRL's GRPOTrainer does not call it): in
    float32 those tensors, the residual stream and the engine's KV cache would take twice the
    memory, and the KV plan assumes ``model.dtype``. Gradient checkpointing (and the input
    gradients its reentrant form needs) is the trainer's own ``model.gradient_checkpointing``.
    Returns ``model``."""
    if upcast_float32:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        param.requires_grad_(False)
    return model

"""QLoRA for the GRPO trainer: ``model.load_in_4bit`` (NF4 with double quantization, computing in
``model.dtype``).

:func:`build_4bit_base` builds the base the trainer wraps with LoRA: a local directory or a cached
Hub id is loaded through transformers' ``BitsAndBytesConfig``; a preset is built in ``model.dtype``,
its weights redrawn per ``model.init_std``, then quantized layer by layer
(:func:`~compilepass.core.quantize.quantize_linears`). Either way every decoder projection is a
bitsandbytes ``Linear4bit``, ``lm_head`` / embedding / norms stay in ``model.dtype``, and the base is
frozen (:func:`~compilepass.core.quantize.prepare_4bit_for_training`); peft then wraps the
projections with its 4-bit LoRA layers (``peft.tuners.lora.bnb.Linear4bit``). The native engine
generates from the same packed weights (:mod:`compilepass.standby.rollout.linear4bit`); the vLLM
engine refuses a 4-bit base (one line).

:func:`check_4bit_object` says whether a model object given in Python agrees with the key.
"""

from __future__ import annotations

import torch

from compilepass.core.errors import ConfigError
from compilepass.core.models import build_model
from compilepass.core.quantize import QUANT_KEY, prepare_4bit_for_training, quant_of, quantize_linears
from compilepass.core.shapes import PRESETS, causal_lm_of

__all__ = ["build_4bit_base", "check_4bit_object"]


def build_4bit_base(config, device: torch.device):
    """The 4-bit, frozen base for ``config.model`` (see the module docstring)."""
    m = config.model
    if m.name_or_path in PRESETS:  # random weights: drawn (and redrawn per init_std) in float, then quantized
        base = build_model(m.name_or_path, dtype=m.torch_dtype, device=device, seed=config.run.seed)
        m.reinit_preset_weights(base, seed=config.run.seed)
        quantize_linears(base, m.torch_dtype)
    else:
        base = build_model(m.name_or_path, dtype=m.torch_dtype, device=device, seed=config.run.seed,
                           cache_dir=m.cache_dir, load_in_4bit=True)
    return prepare_4bit_for_training(base)


def check_4bit_object(config, model) -> None:
    """A model object passed with ``model.load_in_4bit: true`` must hold 4-bit weights already (it is
    trained as given, never quantized in place): else one ConfigError line."""
    if config.model.load_in_4bit and quant_of(causal_lm_of(model)) is None:
        raise ConfigError(f"'{QUANT_KEY}' is true but the model object given has no 4-bit weights: load it with "
                          f"transformers' BitsAndBytesConfig(load_in_4bit=True), or pass its name or path")

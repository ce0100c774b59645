"""The policy a GRPO run trains and its tokenizer: from the config, or objects passed in Python.

``model.name_or_path`` is a preset (random weights), a local Hugging Face directory or a Hub id
whose snapshot is in the local Hugging Face cache (``model.cache_dir``, else huggingface_hub's;
never downloaded: :func:`~compilepass.core.shapes.local_model_path`). In Python,
``GRPOTrainer(config, model=..., processing_class=..., peft_config=...)`` also takes:

- ``model``: a name or path as above (it replaces ``model.name_or_path``), a transformers causal LM
  object (trained as given: its dtype, moved to the run's device), or a peft model (its adapter is
  the one trained);
- ``processing_class``: the tokenizer (a transformers tokenizer, or a processor holding one); by
  default the model's own, loaded from its directory or cached Hub id;
- ``peft_config``: a ``peft.LoraConfig`` instead of the ``model.lora_*`` keys.

Any causal LM family transformers builds is trained. LoRA: when none of ``model.lora_targets``
names a module of the model and the targets are the defaults (Llama / Qwen projection names),
peft's ``"all-linear"`` is used instead (said in the log); targets that a user set and that match
nothing are a ConfigError naming the model's linear layers. MLP tiling
(``model.mlp_chunk_tokens``) applies to the native engine's families only (off for others, said in
the log); gradient checkpointing is transformers' own and applies to every family.
``model.load_in_4bit``: a 4-bit NF4 base under the adapter (QLoRA; :mod:`~compilepass.standby.grpo.qlora`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from compilepass.core.errors import ConfigError
from compilepass.core.models import DEFAULT_LORA_TARGETS, add_lora, build_model
from compilepass.core.quantize import quant_of
from compilepass.core.shapes import causal_lm_of, local_model_path
from compilepass.standby.grpo.data import HFTokenizer, load_tokenizer
from compilepass.standby.grpo.qlora import build_4bit_base, check_4bit_object
from compilepass.standby.rollout.hf_backend import native_family_problem
from compilepass.standby.training.checkpointing import enable_checkpointing
from compilepass.standby.training.train_memory import tile_mlp

log = logging.getLogger(__name__)

__all__ = ["adopt_model_arg", "build_policy", "load_policy_tokenizer", "lora_targets_for", "apply_training_memory",
           "is_model_object"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def is_model_object(model: Any) -> bool:
    return isinstance(model, torch.nn.Module)


def _is_peft_model(model: Any) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def adopt_model_arg(config, model: Any) -> None:
    """Record what ``model`` (the ``GRPOTrainer(model=...)`` argument) is in ``config.model``
    before validation: a name or path becomes ``name_or_path``; an object's ``name_or_path``
    (``"<object>"`` when it has none) and dtype are recorded, so checkpoints say what was trained."""
    if model is None:
        return
    if isinstance(model, (str, os.PathLike)):
        config.model.name_or_path = str(model)
        return
    if not is_model_object(model) or not hasattr(causal_lm_of(model), "config"):
        raise ConfigError(f"model must be a name, a path or a transformers causal LM object "
                          f"(got {type(model).__name__})")
    lm = causal_lm_of(model)
    config.model.name_or_path = str(getattr(lm, "name_or_path", "") or "") or f"<object {type(lm).__name__}>"
    dtype = next(lm.parameters()).dtype
    if dtype in _DTYPE_NAMES:
        config.model.dtype = _DTYPE_NAMES[dtype]
    if quant_of(lm) is not None:  # a 4-bit object (loaded with BitsAndBytesConfig): the checkpoints say so
        config.model.load_in_4bit = True


def lora_targets_for(model, targets) -> tuple[str, ...] | str:
    """``targets`` when one of them names a module of ``model``; peft's ``"all-linear"`` when none
    does and they are the defaults; else a ConfigError listing the model's linear layer names."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if any(t in names for t in targets):
        return tuple(targets)
    family = getattr(getattr(model, "config", None), "model_type", "?")
    if tuple(targets) == DEFAULT_LORA_TARGETS:
        log.info("LoRA: the default target modules are not in this %s model; using peft's 'all-linear'", family)
        return "all-linear"
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
    raise ConfigError(f"'model.lora_targets' {list(targets)} name no module of this {family} model; "
                      f"its linear layers: {', '.join(linear)}")


def build_policy(config, device: torch.device, model: Any = None, peft_config: Any = None):
    """The peft model to train: built from ``config.model`` (a preset's weights redrawn per
    ``model.init_std``), or the object given, wrapped with a LoRA adapter (``peft_config``, else
    the ``model.lora_*`` keys) unless it is a peft model already."""
    c = config
    if is_model_object(model):
        check_4bit_object(c, model)
        if _is_peft_model(model):
            if peft_config is not None:
                raise ConfigError("peft_config was given for a model that is a peft model already")
            return model.to(device)
        base = model.to(device)
    elif c.model.load_in_4bit:  # QLoRA: a frozen NF4 base (standby.grpo.qlora)
        base = build_4bit_base(c, device)
    else:
        base = build_model(c.model.name_or_path, dtype=c.model.torch_dtype, device=device, seed=c.run.seed,
                           cache_dir=c.model.cache_dir)
        c.model.reinit_preset_weights(base, seed=c.run.seed)
    if peft_config is not None:
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(c.run.seed)
            return get_peft_model(base, peft_config)
    return add_lora(base, rank=c.model.lora_rank, alpha=c.model.lora_alpha,
                    targets=lora_targets_for(base, c.model.lora_targets), seed=c.run.seed, dropout=0.0)


def load_policy_tokenizer(config, processing_class: Any = None, model: Any = None):
    """The run's tokenizer: ``processing_class`` (wrapped), else the model's own (preset: the toy
    byte tokenizer; directory or cached Hub id: ``AutoTokenizer``, local files only)."""
    if processing_class is not None:
        tok = getattr(processing_class, "tokenizer", None) or processing_class
        if not (hasattr(tok, "encode") and hasattr(tok, "decode")):
            raise ConfigError(f"processing_class must be a tokenizer or a processor holding one "
                              f"(got {type(processing_class).__name__})")
        return tok if hasattr(tok, "hf") else HFTokenizer(tok)
    name = config.model.name_or_path
    if is_model_object(model):
        lm = causal_lm_of(model)
        name = str(getattr(lm, "name_or_path", "") or "")
        if not name:
            raise ConfigError("a model object without a name_or_path needs its tokenizer: pass processing_class=")
    return load_tokenizer(local_model_path(name, config.model.cache_dir))


def apply_training_memory(causal_lm, config) -> None:
    """Gradient checkpointing (any family) and MLP tiling (the native engine's families)."""
    m = config.model
    if m.gradient_checkpointing:
        enable_checkpointing(causal_lm, reentrant=m.offload_activations)
    if m.mlp_chunk_tokens:
        problem = native_family_problem(causal_lm)
        if problem is None:
            tile_mlp(causal_lm, m.mlp_chunk_tokens)
        else:
            log.info("model.mlp_chunk_tokens: MLP tiling is off for this model (%s)", problem)

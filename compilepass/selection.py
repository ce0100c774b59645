"""Selection at load: which Inductor options to compile a model with, from the tuning database.

``select(model, "rollout", batch=...)`` looks the model up in the merged database (shipped + user),
drops options the running torch lacks or that a known-bad gate marks unsafe, lets explicit
``options`` override, and logs one line (logger ``compilepass.selection``) saying which entry matched
and why. ``COMPILEPASS_AUTOTUNE=0`` switches the database off (then only explicit options apply).
Entries are looked up for the workload asked: a rollout entry never applies to a training forward.
Any transformers causal LM gets an answer: the families the tuner measures go through the whole
fallback chain; another family (GPT-2, ...) gets its own family's entries or torch's defaults, and a
model whose config gives no sizes gets torch's defaults, with the reason.

``compile(model, workload="train")`` is ``torch.compile`` with the selected options, passed as its
``options`` (applied to that compile only, never to Inductor's global config);
``vllm_compilation_config(model)`` is what vLLM's ``compilation_config`` takes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from compilepass.core.env import EnvironmentKey, current_environment
from compilepass.core.errors import ConfigError, ModelNotFoundError
from compilepass.core.quantize import quant_of
from compilepass.core.shapes import FAMILIES, PRESETS, ModelShape, causal_lm_of, model_not_found
from compilepass.core.workload_spec import WORKLOAD_KINDS
from compilepass.db import (LEVEL_NAMES, ModelSignature, Query, TuneKey, bucket_dims, bucket_string, dtype_name, lookup,
                            merged_view)
from compilepass.flags import FlagSpace, inductor_options_for_torch

log = logging.getLogger("compilepass.selection")

AUTOTUNE_ENV = "COMPILEPASS_AUTOTUNE"
VLLM_ENV_MAX_AUTOTUNE = "VLLM_ENABLE_INDUCTOR_MAX_AUTOTUNE"
VLLM_ENV_COORDINATE_DESCENT = "VLLM_ENABLE_INDUCTOR_COORDINATE_DESCENT_TUNING"

#: What a model is compiled for at load (``compile``): generation or the training forward.
COMPILE_WORKLOADS = ("rollout", "train")
#: Each lookup level as the log line names it (the entry's basis).
BASIS = {1: "exact entry", 2: "nearby size bucket", 3: "family fallback", 4: "same torch and GPU architecture",
         5: "torch defaults"}


@dataclass
class Selection:
    flags: dict  # what to pass as torch.compile(options=...)
    match_level: Optional[int]  # 1..5 (db.LEVEL_NAMES); None when the database was not consulted
    reason: str
    entry_id: Optional[str]
    dropped: dict = field(default_factory=dict)  # flag -> why it was not applied
    source: str = ""
    workload: str = ""
    model: str = ""  # what was looked up: "llama 2x64 float32" (family, layers x hidden, dtype)

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES.get(self.match_level, "off") if self.match_level else "off"

    @property
    def basis(self) -> str:
        """exact entry / nearby size bucket / family fallback / same torch and GPU architecture /
        torch defaults, or "database off" / "not looked up" when no lookup ran."""
        if self.match_level is None:
            return "database off" if self.reason.startswith(AUTOTUNE_ENV) else "not looked up"
        return BASIS[self.match_level]


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _model_device(model) -> Optional[str]:
    try:
        return next(model.parameters()).device.type
    except (AttributeError, StopIteration, TypeError):
        return None


def _model_dtype(model):
    try:
        return next(model.parameters()).dtype
    except (AttributeError, StopIteration, TypeError):
        return None


def _cpu_environment(env: EnvironmentKey) -> EnvironmentKey:
    if env.device_kind == "cpu":
        return env
    return dataclasses.replace(env, device_name="cpu:" + (platform.processor() or platform.machine()),
                               compute_capability=None)


class UnkeyedModel(ValueError):
    """A model the database has no key for (its config gives no sizes): torch's defaults apply."""


def model_signature(model, dtype=None, device_kind: str = "cpu") -> ModelSignature:
    """The signature of a transformers causal LM (peft-wrapped or not, any family), a ModelShape, a
    preset name, a local directory or a Hub id in the local Hugging Face cache.

    Without ``dtype``: the model's parameter dtype, else the tuner's ``auto`` rule (bfloat16 on CUDA,
    float32 on CPU). A model object with 4-bit base weights is keyed with its quantization
    (``ModelSignature.quant``; names and shapes are 16-bit). A name found nowhere is
    ModelNotFoundError; a config without sizes UnkeyedModel."""
    config, quant = None, None
    if isinstance(model, ModelShape):
        shape = model
    elif isinstance(model, (str, os.PathLike)):
        name = str(model)
        if name in PRESETS:
            shape = PRESETS[name]
        else:
            config = _config_of_name(name)
    else:
        config = getattr(causal_lm_of(model), "config", None)
        if config is None:
            raise UnkeyedModel(f"no database key for a {type(model).__name__}: it has no transformers config")
        dtype = dtype or _model_dtype(model)
        quant = quant_of(model) if hasattr(model, "modules") else None  # a 4-bit (QLoRA) base: its own key
    if dtype is None:
        dtype = "bfloat16" if device_kind == "cuda" else "float32"
    if config is None:
        return ModelSignature.from_shape(shape, dtype_name(dtype))
    try:
        return ModelSignature.from_hf_config(config, dtype_name(dtype), quant)
    except (ValueError, TypeError, AttributeError, ZeroDivisionError) as exc:
        raise UnkeyedModel(f"no database key for {getattr(config, 'model_type', '') or 'this model'}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _config_of_name(name: str):
    """The transformers config of a local directory or of a Hub id already in the local cache."""
    from transformers import AutoConfig  # heavy: only for a model given by name

    if (Path(name) / "config.json").is_file():
        try:
            return AutoConfig.from_pretrained(name)
        except (OSError, ValueError, KeyError) as exc:
            raise UnkeyedModel(f"{name}/config.json does not load ({str(exc).splitlines()[0]})") from None
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:  # not a Hub id, or not downloaded: bad input, one line
        raise ModelNotFoundError(f"{model_not_found(name)} (nor a Hub id in the local Hugging Face cache)") from None


def _describe_signature(sig: ModelSignature) -> str:
    return f"{sig.family} {sig.num_layers}x{sig.hidden_size} {sig.dtype}" + (f" {sig.quant}" if sig.quant else "")


def select(model, workload: str = "rollout", *, batch: Optional[int] = None, prompt_len: Optional[int] = None,
           new_tokens: Optional[int] = None, seq_len: Optional[int] = None, lora_rank: Optional[int] = None,
           engine: str = "native", policy: str = "balanced", options: Optional[Mapping[str, Any]] = None,
           dtype=None, env: Optional[EnvironmentKey] = None, entries: Optional[list] = None,
           log_line: bool = True) -> Selection:
    """Inductor options for ``model`` under ``workload`` from the tuning database.

    ``options`` are applied on top, unfiltered (the caller asked for them). Unknown sizes (None)
    are matched to the nearest measured bucket. ``env`` and ``entries`` are for tests and tools;
    by default the running environment and the merged database.
    """
    if workload not in WORKLOAD_KINDS:
        raise ConfigError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOAD_KINDS)}")
    explicit = dict(options or {})
    if not autotune_enabled():
        sel = Selection(explicit, None, f"{AUTOTUNE_ENV}=0: tuning database off; "
                        + ("explicit options only" if explicit else "torch's defaults"), None, workload=workload)
        if log_line:
            _log(sel, explicit)
        return sel
    env = env or current_environment()
    device = _model_device(model)
    if device == "cpu":
        env = _cpu_environment(env)
    try:
        signature = model_signature(model, dtype, env.device_kind)
    except UnkeyedModel as exc:
        sel = Selection(explicit, 5, f"{LEVEL_NAMES[5]}: {exc}; using torch's own defaults (no flags)", None,
                        source="curated", workload=workload)
        if log_line:
            _log(sel, explicit)
        return sel
    dims = bucket_dims(workload, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, seq_len=seq_len,
                       lora_rank=lora_rank)
    key = TuneKey.build(env, signature, workload, bucket_string(dims) or "", engine=engine, policy=policy)
    match = lookup(Query(key, dims, cross_family=signature.family in FAMILIES),
                   merged_view() if entries is None else entries)
    space = FlagSpace(env=env, engine=engine)
    kept, dropped = space.filter_unsafe(match.flags)
    for name, value in list(kept.items()):
        try:
            space.validate({name: value})
        except Exception as exc:  # wrong type for this torch
            dropped[name] = str(exc)
            del kept[name]
    flags = {**kept, **explicit}
    sel = Selection(flags, match.level, match.reason, match.entry_id, dropped, match.source, workload,
                    _describe_signature(signature))
    if log_line:
        _log(sel, explicit)
    return sel


def _log(sel: Selection, explicit: Mapping, prefix: str = "", note: str = "") -> None:
    """One line: what was looked up, the basis (exact / fallback / defaults), the entry and why, the flags."""
    what = " ".join(p for p in (sel.workload, sel.model) if p)
    parts = [f"{prefix}{what + ': ' if what else ''}{sel.basis}" + (f" ({note})" if note else ""), sel.reason]
    if sel.dropped:
        parts.append("dropped " + ", ".join(f"{k} ({v.split(' (source')[0]})" for k, v in sel.dropped.items()))
    if explicit:
        parts.append("explicit options " + ", ".join(sorted(explicit)))
    parts.append("flags " + (", ".join(f"{k}={v}" for k, v in sel.flags.items()) or "{} (torch defaults)"))
    log.info("; ".join(parts))


def compile(module_or_fn=None, model=None, workload: Optional[str] = None, options: Optional[Mapping] = None, *,
            batch: Optional[int] = None, prompt_len: Optional[int] = None, new_tokens: Optional[int] = None,
            seq_len: Optional[int] = None, lora_rank: Optional[int] = None, engine: str = "native",
            policy: str = "balanced", **torch_compile_kwargs):
    """``torch.compile(module_or_fn, options=<selected flags>, **torch_compile_kwargs)``: a compiled
    module (or function), the flags applied to this compile only.

    ``model`` (HF model of any family, preset name, directory or cached Hub id) defaults to
    ``module_or_fn`` when that has an HF ``config``; without a model only ``options`` apply.
    ``workload`` is "rollout" (generation) or "train" (the training forward); left out, it is
    "train" for a module in training mode (``model.train()``), else "rollout", and the log line says
    so. A peft model's LoRA rank is read from its adapter. A ``mode`` is merged under the options;
    a backend other than "inductor" takes no Inductor options (the line says they were not applied).
    """
    import torch  # heavy: ``import compilepass`` stays light

    _, kwargs = _compile_kwargs(module_or_fn, model, workload, options, batch=batch, prompt_len=prompt_len,
                                new_tokens=new_tokens, seq_len=seq_len, lora_rank=lora_rank, engine=engine,
                                policy=policy, torch_compile_kwargs=torch_compile_kwargs)
    return torch.compile(module_or_fn, **kwargs)


def compile_module_in_place(module, model=None, workload: Optional[str] = None, options: Optional[Mapping] = None,
                            **kwargs) -> Selection:
    """:func:`compile` for an ``nn.Module`` in place (``module.compile(...)``): the module object, its
    parameters and state-dict keys stay as they are (a trainer's optimizer, peft and checkpoints
    keep working), its forward runs compiled with the selected flags. Returns the Selection."""
    keys = ("batch", "prompt_len", "new_tokens", "seq_len", "lora_rank", "engine", "policy")
    sel_kwargs = {k: kwargs.pop(k) for k in keys if k in kwargs}
    sel, compile_kwargs = _compile_kwargs(module, model, workload, options, torch_compile_kwargs=kwargs, **sel_kwargs)
    module.compile(**compile_kwargs)
    return sel


def _compile_kwargs(module_or_fn, model, workload, options, *, batch=None, prompt_len=None, new_tokens=None,
                    seq_len=None, lora_rank=None, engine="native", policy="balanced",
                    torch_compile_kwargs=None) -> tuple[Selection, dict]:
    """The Selection and ``torch.compile`` keyword arguments of :func:`compile` (logs its one line)."""
    import torch

    torch_compile_kwargs = dict(torch_compile_kwargs or {})
    if model is None and hasattr(module_or_fn, "config") and hasattr(module_or_fn, "parameters"):
        model = module_or_fn
    note = ""
    if workload is None:
        target = module_or_fn if isinstance(module_or_fn, torch.nn.Module) else model
        training = getattr(target, "training", None) if isinstance(target, torch.nn.Module) else None
        workload = "train" if training else "rollout"
        note = (f"workload inferred from model.training={training}" if training is not None
                else "workload rollout by default") + "; pass workload= to choose"
    if workload not in COMPILE_WORKLOADS:
        raise ConfigError(f"compile: unknown workload {workload!r}; choose rollout (generation) or train "
                          f"(the training forward)")
    if lora_rank is None and workload == "train" and model is not None:
        lora_rank = lora_rank_of(model)
    explicit = dict(options or {})
    if model is not None:
        sel = select(model, workload, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, seq_len=seq_len,
                     lora_rank=lora_rank, engine=engine, policy=policy, options=options, log_line=False)
    else:
        sel = Selection(explicit, None, "no model given: tuning database not consulted", None, workload=workload)
    flags = dict(sel.flags)
    mode = torch_compile_kwargs.pop("mode", None)
    backend = torch_compile_kwargs.get("backend", "inductor")
    if backend != "inductor":
        if flags:
            note = "; ".join(p for p in (note, f"backend {backend!r} takes no Inductor options: not applied") if p)
        flags = {}
        if mode is not None:
            torch_compile_kwargs["mode"] = mode
    elif mode is not None:
        from torch._inductor import list_mode_options

        flags = {**list_mode_options(mode), **flags}
    _log(sel, explicit, prefix="compile: ", note=note)
    return sel, {"options": inductor_options_for_torch(flags) or None, **torch_compile_kwargs}


def lora_rank_of(model) -> Optional[int]:
    """The active LoRA adapter's rank of a peft model, else None."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(active, str) else None
    rank = getattr(config or next(iter(configs.values())), "r", None)
    return rank if isinstance(rank, int) else None


def vllm_env(flags: Mapping[str, Any]) -> dict[str, str]:
    """The env vars vLLM (>= 0.11) reads for compile_sizes compiles; its default "1" would turn
    max_autotune and coordinate_descent_tuning on regardless of the selected flags."""
    return {VLLM_ENV_MAX_AUTOTUNE: "1" if flags.get("max_autotune") else "0",
            VLLM_ENV_COORDINATE_DESCENT: "1" if flags.get("coordinate_descent_tuning") else "0"}


def vllm_compilation_config(model, workload: str = "rollout", *, batch: Optional[int] = None,
                            prompt_len: Optional[int] = None, new_tokens: Optional[int] = None,
                            policy: str = "balanced", options: Optional[Mapping] = None, apply_env: bool = False,
                            env: Optional[EnvironmentKey] = None, entries: Optional[list] = None) -> dict:
    """What vLLM's ``compilation_config`` takes: ``{"inductor_compile_config": flags}``, with flags
    selected for engine "vllm" (vLLM-specific gates apply) from rollout entries (vLLM generates).

    ``os.environ`` is left alone unless ``apply_env=True``, which also sets :func:`vllm_env` (the
    ``VLLM_ENABLE_INDUCTOR_*`` variables vLLM reads for its compile_sizes compiles, whose default
    "1" turns max_autotune and coordinate-descent tuning on); ``vllm_env(cfg["inductor_compile_config"])``
    returns them without setting anything."""
    if workload != "rollout":
        raise ConfigError(f"vllm_compilation_config: vLLM generates, so it takes rollout entries; got workload "
                          f"{workload!r}")
    sel = select(model, workload, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, engine="vllm",
                 policy=policy, options=options, env=env, entries=entries)
    if apply_env:
        os.environ.update(vllm_env(sel.flags))
    return {"inductor_compile_config": dict(sel.flags)}

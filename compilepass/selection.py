"""Selection at load: which Inductor options to compile a model with, from the tuning database.

``select(model, "rollout", batch=...)`` looks the model up in the merged database (shipped + user),
drops options the running torch lacks or that a known-bad gate marks unsafe, lets explicit
``options`` override, and logs one line (logger ``compilepass.selection``) saying which entry matched
and why. ``COMPILEPASS_AUTOTUNE=0`` switches the database off (then only explicit options apply).

``compile(fn, model=...)`` is ``torch.compile`` with the selected options;
``vllm_compilation_config(model)`` is what vLLM's ``compilation_config`` takes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from compilepass.core.env import EnvironmentKey, current_environment
from compilepass.core.shapes import ModelShape, causal_lm_of, shape_for
from compilepass.db import (LEVEL_NAMES, ModelSignature, Query, TuneKey, bucket_dims, bucket_string, dtype_name, lookup,
                            merged_view)
from compilepass.flags import FlagSpace, inductor_options_for_torch

log = logging.getLogger("compilepass.selection")

AUTOTUNE_ENV = "COMPILEPASS_AUTOTUNE"
VLLM_ENV_MAX_AUTOTUNE = "VLLM_ENABLE_INDUCTOR_MAX_AUTOTUNE"
VLLM_ENV_COORDINATE_DESCENT = "VLLM_ENABLE_INDUCTOR_COORDINATE_DESCENT_TUNING"


@dataclass
class Selection:
    flags: dict  # what to pass as torch.compile(options=...)
    match_level: Optional[int]  # 1..5 (db.LEVEL_NAMES); None when the database was not consulted
    reason: str
    entry_id: Optional[str]
    dropped: dict = field(default_factory=dict)  # flag -> why it was not applied
    source: str = ""

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES.get(self.match_level, "off") if self.match_level else "off"


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


def model_signature(model, dtype=None, device_kind: str = "cpu") -> ModelSignature:
    """The signature of an HF model (peft-wrapped or not), a ModelShape, a preset name or a local directory.

    Without ``dtype``: the model's parameter dtype, else the tuner's ``auto`` rule (bfloat16 on CUDA,
    float32 on CPU)."""
    if isinstance(model, ModelShape):
        shape = model
    elif isinstance(model, (str, os.PathLike)):
        shape = shape_for(str(model))
    else:
        base = causal_lm_of(model)
        shape = ModelShape.from_hf_config(base.config)
        dtype = dtype or _model_dtype(model)
    if dtype is None:
        dtype = "bfloat16" if device_kind == "cuda" else "float32"
    return ModelSignature.from_shape(shape, dtype_name(dtype))


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
    explicit = dict(options or {})
    if not autotune_enabled():
        sel = Selection(explicit, None, f"{AUTOTUNE_ENV}=0: tuning database off; "
                        + ("explicit options only" if explicit else "torch's defaults"), None)
        _log(sel, explicit)
        return sel
    env = env or current_environment()
    device = _model_device(model)
    if device == "cpu":
        env = _cpu_environment(env)
    signature = model_signature(model, dtype, env.device_kind)
    dims = bucket_dims(workload, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, seq_len=seq_len,
                       lora_rank=lora_rank)
    key = TuneKey.build(env, signature, workload, bucket_string(dims) or "", engine=engine, policy=policy)
    match = lookup(Query(key, dims), merged_view() if entries is None else entries)
    space = FlagSpace(env=env, engine=engine)
    kept, dropped = space.filter_unsafe(match.flags)
    for name, value in list(kept.items()):
        try:
            space.validate({name: value})
        except Exception as exc:  # wrong type for this torch
            dropped[name] = str(exc)
            del kept[name]
    flags = {**kept, **explicit}
    sel = Selection(flags, match.level, match.reason, match.entry_id, dropped, match.source)
    if log_line:
        _log(sel, explicit)
    return sel


def _log(sel: Selection, explicit: Mapping) -> None:
    parts = [sel.reason]
    if sel.dropped:
        parts.append("dropped " + ", ".join(f"{k} ({v.split(' (source')[0]})" for k, v in sel.dropped.items()))
    if explicit:
        parts.append("explicit options " + ", ".join(sorted(explicit)))
    parts.append("flags " + (", ".join(f"{k}={v}" for k, v in sel.flags.items()) or "{} (torch defaults)"))
    log.info("; ".join(parts))


def compile(module_or_fn=None, model=None, workload: str = "rollout", options: Optional[Mapping] = None, *,
            batch: Optional[int] = None, prompt_len: Optional[int] = None, new_tokens: Optional[int] = None,
            engine: str = "native", policy: str = "balanced", **torch_compile_kwargs):
    """``torch.compile(module_or_fn, options=<selected flags>, **torch_compile_kwargs)``.

    ``model`` (HF model, preset name or directory) defaults to ``module_or_fn`` when that has an HF
    ``config``; without a model only ``options`` apply. A ``mode`` is merged under the options.
    """
    import torch  # heavy: ``import compilepass`` stays light

    if model is None and hasattr(module_or_fn, "config") and hasattr(module_or_fn, "parameters"):
        model = module_or_fn
    if model is not None:
        sel = select(model, workload, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, engine=engine,
                     policy=policy, options=options)
        flags = sel.flags
    else:
        flags = dict(options or {})
        log.info("no model given: tuning database not consulted; flags %s", flags or "{} (torch defaults)")
    mode = torch_compile_kwargs.pop("mode", None)
    if mode is not None:
        from torch._inductor import list_mode_options

        flags = {**list_mode_options(mode), **flags}
    return torch.compile(module_or_fn, options=inductor_options_for_torch(flags) or None, **torch_compile_kwargs)


def vllm_env(flags: Mapping[str, Any]) -> dict[str, str]:
    """The env vars vLLM (>= 0.11) reads for compile_sizes compiles; its default "1" would turn
    max_autotune and coordinate_descent_tuning on regardless of the selected flags."""
    return {VLLM_ENV_MAX_AUTOTUNE: "1" if flags.get("max_autotune") else "0",
            VLLM_ENV_COORDINATE_DESCENT: "1" if flags.get("coordinate_descent_tuning") else "0"}


def vllm_compilation_config(model, workload: str = "rollout", *, batch: Optional[int] = None,
                            prompt_len: Optional[int] = None, new_tokens: Optional[int] = None,
                            policy: str = "balanced", options: Optional[Mapping] = None, set_env: bool = True,
                            env: Optional[EnvironmentKey] = None, entries: Optional[list] = None) -> dict:
    """What vLLM's ``compilation_config`` takes: ``{"inductor_compile_config": flags}``, with flags
    selected for engine "vllm" (vLLM-specific gates apply), and sets :func:`vllm_env` in
    ``os.environ`` (``set_env=False`` leaves the environment alone)."""
    sel = select(model, workload, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, engine="vllm",
                 policy=policy, options=options, env=env, entries=entries)
    if set_env:
        os.environ.update(vllm_env(sel.flags))
    return {"inductor_compile_config": dict(sel.flags)}

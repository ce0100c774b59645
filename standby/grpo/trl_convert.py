"""``GRPOArguments`` (TRL's flat names) to our sectioned ``GRPOConfig`` and back.

:func:`to_grpo_config` is the one conversion; :data:`~compilepass.standby.grpo.trl_args.MAPPING` is
its table (each TRL field and the keys it sets). Where the two differ in more than the name:

- batch: TRL makes one optimizer step of ``per_device_train_batch_size * processes *
  gradient_accumulation_steps`` completions and one generation of ``generation_batch_size``; here a
  step generates once and updates once, so the two must be equal (the default) and
  ``data.prompts_per_step`` is that count over ``num_generations``; ``optim.micro_batch_size`` is
  ``per_device_train_batch_size``. ``num_iterations`` > 1 is refused: TRL counts each reuse of a
  generation as a step, our ``loss.num_iterations`` updates within one step (set it through
  ``overrides`` knowing that).
- ``max_steps`` -1 runs ``num_train_epochs`` over ``train_dataset``: ``ceil(epochs * (rows //
  prompts_per_step))`` steps, as TRL counts them. ``warmup_steps`` / ``logging_steps`` /
  ``save_steps`` below 1 are fractions of ``max_steps`` (transformers 5); ``warmup_ratio`` too.
- ``lr_scheduler_type`` is transformers' name; its ``constant`` ignores the warmup, as in
  transformers (ours with a warmup is ``constant_with_warmup``). ``save_strategy`` ``no`` still
  writes the last step's checkpoint and the final adapter. ``save_total_limit`` None keeps all.
- ``epsilon_high`` None is ``epsilon``; ``seed`` also seeds the data order unless ``data_seed``.
- ``vllm_importance_sampling_correction`` (TRL: on, for vLLM) applies with ``engine`` vllm only,
  as in TRL; ``loss.importance_sampling_correction`` through ``overrides`` corrects either engine.
- ``model_init_kwargs`` takes ``dtype`` (``torch_dtype``) only: ``model.dtype``.

:func:`from_grpo_config` goes the other way: every key that the flat fields cannot say lands in
``overrides``, so ``to_grpo_config(from_grpo_config(c)) == c`` for any config. :func:`apply_arguments`
sets some fields on top of a config (``compilepass grpo --learning_rate 1e-5``), and
:func:`trainer_config` is what ``GRPOTrainer(args=...)`` calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import typing
from typing import Any, Optional

from compilepass.core.errors import ConfigError
from compilepass.kernels.grpo_loss import LOSS_TYPES
from compilepass.standby.grpo.coercion import coerce
from compilepass.standby.grpo.config import SECTIONS, GRPOConfig
from compilepass.standby.grpo.lr_schedule import SCHEDULERS, scheduler_name
from compilepass.standby.grpo.trl_args import MAPPING, GRPOArguments

log = logging.getLogger(__name__)

__all__ = ["to_grpo_config", "from_grpo_config", "apply_arguments", "trainer_config"]

_SOURCE = "GRPOArguments"
_DICT_FIELDS = ("lr_scheduler_kwargs", "chat_template_kwargs", "model_init_kwargs", "overrides")
_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
#: Our key -> the TRL field named in messages about it (the field whose main key it is).
_TRL_NAME = {**{keys[0]: name for name, keys in reversed(list(MAPPING.items())) if keys}, "generation.engine": "engine"}


def to_grpo_config(args: GRPOArguments, *, num_examples: Optional[int] = None) -> GRPOConfig:
    """The sectioned config for ``args`` (validated); ``num_examples``: the train dataset's rows,
    for ``max_steps`` -1. ConfigError (one line) lists every value that cannot be honoured."""
    a = _checked(args)
    problems: list[str] = []
    out: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}

    def put(key: str, value: Any) -> None:
        section, name = key.split(".")
        out[section][name] = value

    # the same value under another name
    for name in _RENAMED:
        put(MAPPING[name][0], getattr(a, name))
    put("optim.betas", [a.adam_beta1, a.adam_beta2])
    put("optim.scheduler_kwargs", a.lr_scheduler_kwargs or {})
    put("data.chat_template_kwargs", a.chat_template_kwargs or {})
    put("loss.epsilon_low", a.epsilon)
    put("loss.epsilon_high", a.epsilon if a.epsilon_high is None else a.epsilon_high)
    put("run.seed", a.seed)
    put("data.seed", a.seed if a.data_seed is None else a.data_seed)
    put("run.device", "cpu" if a.use_cpu else a.device)
    if a.use_cpu and a.device not in ("auto", "cpu"):
        problems.append(f"use_cpu=True with device={a.device!r}")

    if a.scale_rewards not in ("group", "none"):  # True / False were made group / none by _checked
        problems.append(f"scale_rewards={a.scale_rewards!r} (group or none: rewards are scaled by the group's std or not)")
    put("loss.scale_rewards", a.scale_rewards == "group")
    if a.loss_type not in LOSS_TYPES:
        problems.append(f"loss_type={a.loss_type!r} (supported: {', '.join(LOSS_TYPES)})")
    if a.optim not in _OPTIMIZERS:
        problems.append(f"optim={a.optim!r} (AdamW only: {', '.join(_OPTIMIZERS)})")

    engine = a.engine if a.engine is not None else ("vllm" if a.use_vllm else "native")
    if a.use_vllm and engine != "vllm":
        problems.append(f"use_vllm=True with engine={engine!r}")
    if a.use_vllm and a.vllm_mode != "colocate":
        problems.append(f"vllm_mode={a.vllm_mode!r} (colocate only: vLLM runs in this process)")
    put("generation.engine", engine)
    put("loss.importance_sampling_correction", a.vllm_importance_sampling_correction and engine == "vllm")

    # batch sizes: one generation per optimizer step
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    per_update = a.per_device_train_batch_size * world * a.gradient_accumulation_steps
    gen_batch = a.generation_batch_size
    if a.generation_batch_size is not None and a.steps_per_generation is not None:
        problems.append("generation_batch_size and steps_per_generation both set (TRL refuses that too)")
    elif a.steps_per_generation is not None:
        gen_batch = a.per_device_train_batch_size * world * a.steps_per_generation
    gen_batch = per_update if gen_batch is None else gen_batch
    if gen_batch != per_update:
        problems.append(f"a generation batch of {gen_batch} completions for optimizer steps of {per_update} "
                        f"(per_device_train_batch_size * processes * gradient_accumulation_steps): one generation "
                        f"per optimizer step here; make them equal")
    if a.num_generations >= 1 and gen_batch % a.num_generations:
        problems.append(f"a generation batch of {gen_batch} completions is not whole groups of num_generations="
                        f"{a.num_generations}")
    prompts_per_step = max(1, gen_batch // max(1, a.num_generations))
    put("data.prompts_per_step", prompts_per_step)
    put("optim.micro_batch_size", a.per_device_train_batch_size)
    if a.num_iterations != 1:
        problems.append(f"num_iterations={a.num_iterations} (TRL counts each reuse as a step; "
                        f"overrides={{'loss.num_iterations': k}} updates k times within one step)")

    # how long, and what is counted in steps
    max_steps = a.max_steps
    if max_steps <= 0:
        if num_examples is None:
            problems.append(f"max_steps={a.max_steps} without a train_dataset of known length to run "
                            f"num_train_epochs over; set max_steps")
            max_steps = 1
        else:
            max_steps = max(1, math.ceil(a.num_train_epochs * max(1, num_examples // prompts_per_step)))
    put("run.max_steps", max_steps)
    warmup = a.warmup_steps if a.warmup_ratio is None or a.warmup_steps > 0 else a.warmup_ratio
    warmup = _steps("warmup_steps", warmup, max_steps, problems)
    if a.lr_scheduler_type not in SCHEDULERS:
        problems.append(f"lr_scheduler_type={a.lr_scheduler_type!r} (supported: {', '.join(SCHEDULERS)})")
    if a.lr_scheduler_type == "constant" and warmup > 0:
        log.warning("lr_scheduler_type 'constant' ignores warmup_steps (as in transformers); "
                    "'constant_with_warmup' warms up")
        warmup = 0
    put("optim.scheduler", a.lr_scheduler_type)
    put("optim.warmup_steps", warmup)
    put("run.log_every", max(1, _steps("logging_steps", a.logging_steps, max_steps, problems)))
    if a.save_strategy == "no":
        put("run.save_every", 0)
    elif a.save_strategy == "steps":
        put("run.save_every", _steps("save_steps", a.save_steps, max_steps, problems))
    else:
        problems.append(f"save_strategy={a.save_strategy!r} (steps or no)")
    put("run.keep_last", max_steps if a.save_total_limit is None else a.save_total_limit)

    init_kwargs = dict(a.model_init_kwargs or {})
    dtype = init_kwargs.pop("dtype", init_kwargs.pop("torch_dtype", None))
    if dtype is not None:
        put("model.dtype", str(dtype).removeprefix("torch."))
    if init_kwargs:
        problems.append(f"model_init_kwargs keys {', '.join(sorted(init_kwargs))} (dtype only)")
    if problems:
        raise ConfigError(f"{_SOURCE}: not supported here: " + "; ".join(problems))
    data = GRPOConfig().to_dict()
    for section, values in out.items():
        data[section].update(values)
    for key, value in (a.overrides or {}).items():
        section, _, name = str(key).partition(".")
        if section not in SECTIONS or not name or "." in name:
            raise ConfigError(f"{_SOURCE}: overrides key {key!r} must be section.key (sections: {', '.join(SECTIONS)})")
        data[section][name] = value
    try:
        return GRPOConfig.from_dict(data, source=_SOURCE)
    except ConfigError as e:
        raise ConfigError(_trl_names(str(e))) from None


def from_grpo_config(config: GRPOConfig) -> GRPOArguments:
    """``GRPOArguments`` that convert back to ``config`` exactly: TRL's fields where they say it,
    the remaining keys in ``overrides``."""
    c = config.validate(rewards_given=True)
    kw: dict[str, Any] = {name: _get(c, MAPPING[name][0]) for name in _RENAMED}
    g, o, r = c.generation, c.optim, c.run
    total = c.data.prompts_per_step * g.num_generations
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    per_device = o.micro_batch_size if o.micro_batch_size > 0 and total % (o.micro_batch_size * world) == 0 else \
        max(1, total // world)
    kw.update(
        adam_beta1=o.betas[0], adam_beta2=o.betas[1], lr_scheduler_kwargs=dict(o.scheduler_kwargs) or None,
        lr_scheduler_type=scheduler_name(o.scheduler, o.warmup_steps), warmup_steps=o.warmup_steps,
        chat_template_kwargs=dict(c.data.chat_template_kwargs) or None, epsilon=c.loss.epsilon_low,
        epsilon_high=c.loss.epsilon_high, seed=r.seed, data_seed=None if c.data.seed == r.seed else c.data.seed,
        device=r.device, scale_rewards="group" if c.loss.scale_rewards else "none", engine=g.engine,
        use_vllm=g.engine == "vllm",  # TRL's correction applies to vLLM only: its default for the native engine
        vllm_importance_sampling_correction=c.loss.importance_sampling_correction if g.engine == "vllm" else True,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=max(1, total // (per_device * world)),
        max_steps=r.max_steps, logging_steps=r.log_every, save_strategy="steps" if r.save_every else "no",
        save_steps=r.save_every or 500, save_total_limit=None if r.keep_last >= r.max_steps else r.keep_last,
        model_init_kwargs={"dtype": c.model.dtype},
    )
    flat = GRPOArguments(**kw)
    flat.overrides = _difference(c, to_grpo_config(flat)) or None
    return flat


def apply_arguments(base: GRPOConfig, given: dict[str, Any]) -> GRPOConfig:
    """``base`` with the ``GRPOArguments`` fields in ``given`` set, in TRL's meaning (the rest of
    ``base`` kept as it is)."""
    unknown = set(given) - set(MAPPING)
    if unknown:
        from compilepass.standby.grpo.trl_args import unsupported_names

        raise ConfigError(unsupported_names(unknown))
    flat = from_grpo_config(base)
    touched = {key for name in given for key in MAPPING[name]}
    kept = {k: v for k, v in (flat.overrides or {}).items() if k not in touched}
    extra = _as_dict("overrides", given.get("overrides")) or {}
    flat = dataclasses.replace(flat, **{**given, "overrides": {**kept, **extra} or None})
    return to_grpo_config(flat)


def trainer_config(config: Any, args: Any, reward_funcs: Any, train_dataset: Any) -> tuple[GRPOConfig, Any]:
    """What ``GRPOTrainer(config)`` / ``GRPOTrainer(args=...)`` runs with: the sectioned config and
    the reward functions (paired with ``reward_weights`` when those are given)."""
    if config is not None and args is not None:
        raise ConfigError("give the config once: GRPOTrainer(config) or GRPOTrainer(args=...)")
    a = args if args is not None else config
    if a is None:
        a = GRPOArguments()
    if isinstance(a, GRPOConfig):
        return a, reward_funcs
    if not isinstance(a, GRPOArguments):
        what = type(a).__module__.split(".")[0] + "." + type(a).__name__
        hint = (" (TRL's own class: use compilepass.GRPOArguments with the same names, or "
                "compilepass.integrations.trl.GRPOTrainer)" if what == "trl.GRPOConfig" else
                "; TRL's order GRPOTrainer(model, reward_funcs, args) takes keywords here")
        raise ConfigError(f"args must be a GRPOArguments or a GRPOConfig, not {what}{hint}")
    overrides = _as_dict("overrides", a.overrides) or {}
    if train_dataset is None and "data.dataset" not in overrides:
        raise ConfigError("GRPOArguments needs train_dataset=... (as TRL's GRPOTrainer does) or "
                          "overrides={'data.dataset': FILE or 'builtin:NAME'}")
    config = to_grpo_config(a, num_examples=_rows(train_dataset, overrides.get("data.split", "train")))
    if a.reward_weights is None:
        return config, reward_funcs
    weights = list(a.reward_weights)
    if reward_funcs is None:
        raise ConfigError("reward_weights needs reward_funcs=[...] (one weight per function)")
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if len(funcs) != len(weights):
        raise ConfigError(f"reward_weights has {len(weights)} weights for {len(funcs)} reward functions")
    if any(isinstance(f, tuple) for f in funcs):
        raise ConfigError("reward_weights with (function, weight) pairs in reward_funcs: give the weights once")
    return config, [(f, float(w)) for f, w in zip(funcs, weights)]


# ------------------------------------------------------------------------------------------------

#: The fields whose value is the sectioned key's value unchanged (the rest are composed above).
_RENAMED = ("output_dir", "report_to", "learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm",
            "num_generations", "shuffle_dataset", "max_prompt_length", "max_completion_length", "temperature",
            "top_p", "top_k", "beta", "loss_type", "importance_sampling_level", "mask_truncated_completions",
            "use_bias_correction_kl", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_min",
            "vllm_importance_sampling_clip_max", "gradient_checkpointing", "standby", "gpu_memory_utilization")


def _checked(args: GRPOArguments) -> GRPOArguments:
    """A copy of ``args`` with every field checked against its annotation (JSON strings of the
    dict fields parsed, as TRL's command line gives them)."""
    hints = typing.get_type_hints(GRPOArguments)
    values = {}
    for f in dataclasses.fields(GRPOArguments):
        value = getattr(args, f.name)
        if f.name in _DICT_FIELDS:
            value = _as_dict(f.name, value)
        elif f.name == "scale_rewards" and isinstance(value, bool):
            value = "group" if value else "none"
        else:
            value = coerce(value, hints[f.name], f.name, _SOURCE)
        values[f.name] = value
    return GRPOArguments(**values)


def _as_dict(name: str, value: Any) -> Optional[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"{_SOURCE}: '{name}' must be a mapping or its JSON text (got {value!r}: {e})") from None
    return coerce(value, Optional[dict[str, Any]], name, _SOURCE)


def _steps(name: str, value: float, max_steps: int, problems: list[str]) -> int:
    """A step count, or a fraction of ``max_steps`` when below 1 (transformers 5)."""
    if value < 0:
        problems.append(f"{name}={value} (must be >= 0)")
        return 0
    if 0 < value < 1:
        return math.ceil(max_steps * value)
    if value != int(value):
        problems.append(f"{name}={value} (a whole number of steps, or a fraction of max_steps below 1)")
    return int(value)


def _get(config: GRPOConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _difference(want: GRPOConfig, got: GRPOConfig) -> dict[str, Any]:
    """``section.key: value`` for every key where ``want`` and ``got`` differ."""
    w, g = want.to_dict(), got.to_dict()
    return {f"{s}.{k}": v for s in w for k, v in w[s].items() if g[s].get(k) != v}


def _rows(dataset: Any, split: str) -> Optional[int]:
    if dataset is None:
        return None
    if isinstance(dataset, dict):  # a DatasetDict
        dataset = dataset.get(split)
    try:
        return len(dataset)
    except TypeError:
        return None


def _trl_names(message: str) -> str:
    """``'generation.num_generations' must ...`` -> ``'num_generations' (generation.num_generations) must ...``."""
    m = re.search(r"'([a-z_]+\.[a-z_]+)'", message)
    if m and m.group(1) in _TRL_NAME:
        return message[:m.start()] + f"'{_TRL_NAME[m.group(1)]}' ({m.group(1)})" + message[m.end():]
    return message

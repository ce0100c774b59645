"""``GRPOArguments``: TRL's flat GRPO arguments, under TRL 1.16's names and defaults.

A TRL script passes ``args=trl.GRPOConfig(...)``; here it passes ``args=GRPOArguments(...)`` with the
same names. The name is transformers' ``TrainingArguments`` idiom (flat keyword arguments) and says
what it is, without a second ``GRPOConfig``: that name is taken twice already, by TRL's class and by
our sectioned :class:`~compilepass.standby.grpo.config.GRPOConfig`, which ``GRPOArguments`` becomes
(:func:`~compilepass.standby.grpo.trl_convert.to_grpo_config`; :data:`MAPPING` lists, for each
field, the sectioned keys it sets). ``GRPOTrainer(args=...)`` takes either.

Defaults are TRL 1.16's (with transformers 5's ``TrainingArguments`` below it): ``learning_rate``
1e-6, ``lr_scheduler_type`` linear, ``loss_type`` dapo, ``max_completion_length`` 512,
``per_device_train_batch_size`` 8, ``logging_steps`` 10, ``save_steps`` 500, ``seed`` 42,
``gradient_checkpointing`` true, ``use_bias_correction_kl`` true, ``max_steps`` -1 (then
``num_train_epochs`` over ``train_dataset``). ``max_prompt_length`` is older TRL's (prompts are cut
from the left, 512). ``warmup_ratio`` is older transformers' (transformers 5 reads a
``warmup_steps`` below 1 as the ratio; both work).

Ours, beside TRL's: ``engine`` (native / vllm; ``use_vllm=True`` is vllm), ``standby``,
``gpu_memory_utilization``, ``device``, and ``overrides``: any sectioned key by name, applied last
(``overrides={"model.lora_rank": 8, "generation.stop": ["\\n\\n"]}``).

A name that is not a field (``bf16``, ``eval_steps``, ``push_to_hub``, ...) is
refused with one :class:`~compilepass.core.errors.ConfigError` line listing every such name, at
construction; a field set to a value we cannot honour (``scale_rewards="batch"``, ``loss_type="sapo"``,
``num_iterations=2``, a generation batch that spans several optimizer steps) is refused the same way
when converted. Nothing is dropped silently.

This module imports nothing heavy: the conversion lives in :mod:`~compilepass.standby.grpo.trl_convert`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional, Union

from compilepass.core.errors import ConfigError

__all__ = ["GRPOArguments", "MAPPING", "unsupported_names"]


@dataclass
class GRPOArguments:
    """TRL's GRPO arguments (trl 1.16 ``GRPOConfig`` names and defaults); see the module docstring."""

    # -- run: where, how long, logging and checkpoints
    output_dir: str = "trainer_output"
    max_steps: int = -1
    num_train_epochs: float = 3.0
    seed: int = 42
    data_seed: Optional[int] = None
    logging_steps: float = 10
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: Optional[int] = None
    report_to: Union[None, str, list[str]] = "none"
    use_cpu: bool = False
    # -- optimizer and learning-rate schedule
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch_fused"
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: Union[dict, str, None] = None
    warmup_steps: float = 0
    warmup_ratio: Optional[float] = None
    # -- batch: completions per device per forward, per optimizer step, per generation
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    generation_batch_size: Optional[int] = None
    steps_per_generation: Optional[int] = None
    num_generations: int = 8
    num_iterations: int = 1
    shuffle_dataset: bool = True
    # -- generation
    max_prompt_length: int = 512
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    chat_template_kwargs: Union[dict, str, None] = None
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    # -- loss
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"  # or True / False, as TRL takes them
    importance_sampling_level: str = "token"
    mask_truncated_completions: bool = False
    use_bias_correction_kl: bool = True
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_min: Optional[float] = None
    vllm_importance_sampling_clip_max: Optional[float] = 3.0
    reward_weights: Optional[list[float]] = None
    # -- model
    gradient_checkpointing: bool = True
    model_init_kwargs: Union[dict, str, None] = None
    # -- ours
    engine: Optional[str] = None  # native / vllm (None: vllm when use_vllm, else native)
    standby: bool = True
    gpu_memory_utilization: float = 0.95
    device: str = "auto"
    overrides: Union[dict, str, None] = None  # {"section.key": value}, applied last


#: Each field of :class:`GRPOArguments` and the sectioned config keys it sets (the first is the
#: main one). One key: the same value under TRL's name, except where :mod:`trl_convert` says
#: otherwise (ratios of ``max_steps``, TRL's spellings of booleans, JSON strings from the command line).
MAPPING: dict[str, tuple[str, ...]] = {
    "output_dir": ("run.output_dir",),
    "max_steps": ("run.max_steps", "optim.warmup_steps", "run.log_every", "run.save_every", "run.keep_last"),
    "num_train_epochs": ("run.max_steps", "optim.warmup_steps", "run.log_every", "run.save_every", "run.keep_last"),
    "seed": ("run.seed", "data.seed"),
    "data_seed": ("data.seed",),
    "logging_steps": ("run.log_every",),
    "save_strategy": ("run.save_every",),
    "save_steps": ("run.save_every",),
    "save_total_limit": ("run.keep_last",),
    "report_to": ("run.report_to",),
    "use_cpu": ("run.device",),
    "learning_rate": ("optim.lr",),
    "weight_decay": ("optim.weight_decay",),
    "adam_beta1": ("optim.betas",),
    "adam_beta2": ("optim.betas",),
    "adam_epsilon": ("optim.eps",),
    "max_grad_norm": ("optim.max_grad_norm",),
    "optim": (),  # AdamW (torch.optim.AdamW) is the one optimizer: adamw_torch / adamw_torch_fused
    "lr_scheduler_type": ("optim.scheduler", "optim.warmup_steps"),
    "lr_scheduler_kwargs": ("optim.scheduler_kwargs",),
    "warmup_steps": ("optim.warmup_steps",),
    "warmup_ratio": ("optim.warmup_steps",),
    "per_device_train_batch_size": ("optim.micro_batch_size", "data.prompts_per_step"),
    "gradient_accumulation_steps": ("data.prompts_per_step",),
    "generation_batch_size": ("data.prompts_per_step",),
    "steps_per_generation": ("data.prompts_per_step",),
    "num_generations": ("generation.num_generations", "data.prompts_per_step"),
    "num_iterations": ("loss.num_iterations",),
    "shuffle_dataset": ("data.shuffle",),
    "max_prompt_length": ("generation.max_prompt_len",),
    "max_completion_length": ("generation.max_completion_len",),
    "temperature": ("generation.temperature",),
    "top_p": ("generation.top_p",),
    "top_k": ("generation.top_k",),
    "chat_template_kwargs": ("data.chat_template_kwargs",),
    "use_vllm": ("generation.engine", "loss.importance_sampling_correction"),
    "vllm_mode": (),  # colocate only (vLLM in this process)
    "beta": ("loss.beta",),
    "epsilon": ("loss.epsilon_low", "loss.epsilon_high"),
    "epsilon_high": ("loss.epsilon_high",),
    "loss_type": ("loss.loss_type",),
    "scale_rewards": ("loss.scale_rewards",),
    "importance_sampling_level": ("loss.importance_sampling_level",),
    "mask_truncated_completions": ("loss.mask_truncated_completions",),
    "use_bias_correction_kl": ("loss.use_bias_correction_kl",),
    "vllm_importance_sampling_correction": ("loss.importance_sampling_correction",),
    "vllm_importance_sampling_mode": ("loss.importance_sampling_mode",),
    "vllm_importance_sampling_clip_min": ("loss.importance_sampling_clip_min",),
    "vllm_importance_sampling_clip_max": ("loss.importance_sampling_clip_max",),
    "reward_weights": ("reward.functions",),
    "gradient_checkpointing": ("model.gradient_checkpointing",),
    "model_init_kwargs": ("model.dtype",),
    "engine": ("generation.engine", "loss.importance_sampling_correction"),
    "standby": ("generation.standby",),
    "gpu_memory_utilization": ("generation.gpu_memory_utilization",),
    "device": ("run.device",),
    "overrides": (),
}

#: What to use instead, for TRL names people set often that are not fields here.
_HINTS = {
    "bf16": "the weights' dtype is model_init_kwargs={'dtype': 'bfloat16'}",
    "fp16": "the weights' dtype is model_init_kwargs={'dtype': 'float16'}",
    "torch_dtype": "model_init_kwargs={'dtype': ...}",
    "vllm_gpu_memory_utilization": "gpu_memory_utilization is the engine's whole budget",
    "vllm_enable_sleep_mode": "standby=True (the default) sleeps the KV cache while training",
    "disable_dropout": "dropout is always off here",
    "remove_unused_columns": "every column reaches the rewards",
    "logging_strategy": "logging_steps",
}


def unsupported_names(names) -> str:
    """The one-line message for names that are not fields of :class:`GRPOArguments`."""
    listed = ", ".join(f"{n} ({_HINTS[n]})" if n in _HINTS else n for n in sorted(names))
    return (f"GRPOArguments: not supported here: {listed}; the fields are TRL's names that apply here "
            f"(compilepass.standby.grpo.trl_args.MAPPING), and overrides={{'section.key': value}} takes our own keys")


def _refuse_unknown(cls):
    """Make ``cls(...)`` with a name that is not a field one ConfigError line, not a TypeError."""
    init = cls.__init__
    names = {f.name for f in dataclasses.fields(cls)}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = set(kwargs) - names
        if unknown:
            raise ConfigError(unsupported_names(unknown))
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


GRPOArguments = _refuse_unknown(GRPOArguments)

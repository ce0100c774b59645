"""The GRPO run configuration: dataclasses, loading from YAML / TOML, command-line overrides.

A config file has up to seven sections, each a dataclass below::
    model:      {name_or_path: tiny, dtype: float32, lora_rank: 8}
    generation: {num_generations: 8, max_completion_len: 16}
    loss:       {loss_type: grpo}
    optim:      {lr: 1.0e-3}
    data:       {dataset: "builtin:repeat", prompts_per_step: 8}
    reward:     {functions: [{name: repeat_letter, weight: 1.0}]}
    run:        {output_dir: runs/tiny, max_steps: 50}

``load_config(path, overrides)`` reads the file (``.yaml`` / ``.yml`` / ``.toml``; no file means
the defaults), applies ``section.key=value`` overrides (values parsed with ``yaml.safe_load``, so
``8``, ``1.0e-3``, ``true``, ``[a, b]`` work; float fields also accept ``1e-3``), and validates
everything. Each problem raises one :class:`~compilepass.core.errors.ConfigError` whose one-line
message names the key (``generation.num_generations``) and, for unknown names, lists the valid ones.
A config built in Python (``GRPOConfig(run=RunConfig(max_steps=...))``) gets the same checks from
``validate()`` (which :class:`~compilepass.standby.grpo.trainer.GRPOTrainer` calls): every value's
type, then its range. Counts and sizes must be >= 1 where 0 would mean nothing; the few where 0
means something say what (``run.save_every``, ``optim.micro_batch_size``, ``model.mlp_chunk_tokens``,
``generation.top_k``, ``optim.warmup_steps``).

``GRPOConfig.to_dict()`` is plain JSON-able data (saved in every checkpoint's meta.json);
``GRPOConfig.from_dict(d)`` reads it back through the same validation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

from compilepass.core.errors import ConfigError
from compilepass.core.shapes import PRESETS
from compilepass.core.workload_spec import ENGINES
from compilepass.kernels.grpo_loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from compilepass.standby.grpo.coercion import coerce, prefix
from compilepass.standby.grpo.data import BUILTIN_TASKS
from compilepass.standby.grpo.loss_options import IS_MODES, check_loss_options
from compilepass.standby.grpo.lr_schedule import SCHEDULERS, make_lr_scheduler
from compilepass.standby.grpo.rewards import BUILTIN_REWARDS
from compilepass.standby.grpo.trackers import check_report_to

__all__ = [
    "ModelConfig", "GenerationConfig", "LossConfig", "OptimConfig", "DataConfig", "RewardSpec",
    "RewardConfig", "RunConfig", "GRPOConfig", "load_config", "default_config", "apply_overrides",
    "DTYPES", "LOSS_TYPES", "SCHEDULERS", "DEFAULT_CONFIGS",
]

DTYPES = ("float32", "bfloat16", "float16")
_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    """The policy: a preset name (random weights), a local Hugging Face model directory or a Hub
    id from the local Hugging Face cache (``cache_dir``, else huggingface_hub's; never downloaded).

    ``init_std`` (presets only; ignored for a directory): redraw every weight matrix of the
    random preset from N(0, init_std) with :meth:`reinit_preset_weights`. Hugging Face's default
    init (std 0.02) gives the tied-embedding tiny preset logits bounded by about +-1.3, a nearly
    uniform policy that no LoRA adapter can sharpen much; 0.15 (the tiny default config) gives
    it a peaked, learnable output distribution.

    Training memory: ``gradient_checkpointing`` (per decoder layer); ``offload_activations``
    moves the checkpointed activations to pinned CPU memory (:mod:`compilepass.standby.training.offload`);
    ``mlp_chunk_tokens`` runs each MLP over that many tokens at a time while training
    (:func:`compilepass.standby.training.train_memory.tile_mlp`; 0 turns it off).
    """

    name_or_path: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora_rank: int = 32
    lora_alpha: float = 64
    lora_targets: list[str] = field(default_factory=lambda: list(_DEFAULT_TARGETS))
    gradient_checkpointing: bool = True
    offload_activations: bool = False
    mlp_chunk_tokens: int = 4096
    init_std: Optional[float] = None
    cache_dir: Optional[str] = None  # the Hugging Face cache a Hub id is read from (None: huggingface_hub's)
    load_in_4bit: bool = False  # QLoRA: NF4 double-quantized base, computing in `dtype` (standby.grpo.qlora)

    def reinit_preset_weights(self, model, seed: int = 0) -> bool:
        """Apply ``init_std`` to a freshly built preset (before ``add_lora``): every 2-D parameter
        from N(0, init_std), biases from N(0, init_std / 3), with a generator seeded by ``seed``.
        Returns whether anything changed (False for a directory or ``init_std`` null)."""
        import torch


        if self.init_std is None or self.name_or_path not in PRESETS:
            return False
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.copy_((torch.randn(p.shape, generator=gen) * self.init_std).to(p.dtype))
                elif name.endswith(".bias"):
                    p.copy_((torch.randn(p.shape, generator=gen) * self.init_std / 3).to(p.dtype))
        return True

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def _validate(self) -> None:
        _require(self.name_or_path != "", "model.name_or_path", "must not be empty")
        _require(self.lora_rank >= 1, "model.lora_rank", f"must be >= 1 (got {self.lora_rank})")
        _require(self.lora_alpha > 0, "model.lora_alpha", f"must be > 0 (got {self.lora_alpha})")
        _require(len(self.lora_targets) > 0, "model.lora_targets", "must name at least one module")
        _require(all(t != "" for t in self.lora_targets), "model.lora_targets", "module names must not be empty")
        _require(self.init_std is None or self.init_std > 0, "model.init_std", f"must be > 0 or null (got {self.init_std})")
        _require(self.mlp_chunk_tokens >= 0, "model.mlp_chunk_tokens",
                 f"must be >= 0, 0 turns MLP tiling off (got {self.mlp_chunk_tokens})")
        if self.load_in_4bit:  # bitsandbytes missing: one line, before any work
            from compilepass.core.quantize import bitsandbytes_available

            _require(bitsandbytes_available(), "model.load_in_4bit",
                     "needs bitsandbytes, which is not installed here: pip install 'compilepass[qlora]'")


@dataclass
class GenerationConfig:
    """Rollout sampling. ``num_generations`` is G, the group size per prompt.

    ``top_k = 0`` and ``top_p = 1.0`` disable those filters. ``stop`` holds stop strings,
    ``stop_token_ids`` extra stop tokens (EOS always stops). ``gpu_memory_utilization`` is the
    fraction of device memory the engine may plan for (weights + KV cache + activations).
    ``standby`` (default true): the KV region sleeps while training runs, so training gets its
    memory; false keeps it mapped (what a stack without standby memory pays; for comparisons).
    ``group_seeds`` (default false): sample each prompt group in its own engine call, seeded from
    (run.seed, step, the group's index in the step's batch), so the completions are the same on any
    number of ranks (torchrun); costs batching (G sequences per call instead of the whole batch).
    ``merge_lora`` (default false; native engine): generate with the LoRA adapters merged into the
    base weights, the base restored bitwise from a host copy after each generation
    (:mod:`compilepass.standby.rollout.lora_merge`): no LoRA GEMMs per decode step, one host-to-device
    copy of the LoRA layers' base weights per step. Not for a 4-bit base.
    """

    engine: Literal[ENGINES] = "native"
    num_generations: int = 8
    max_prompt_len: int = 256
    max_completion_len: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    gpu_memory_utilization: float = 0.95
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    standby: bool = True
    group_seeds: bool = False
    merge_lora: bool = False

    def _validate(self) -> None:
        _require(self.num_generations >= 2, "generation.num_generations",
                 f"must be >= 2: GRPO compares completions within a group (got {self.num_generations})")
        _require(self.max_prompt_len >= 1, "generation.max_prompt_len", f"must be >= 1 (got {self.max_prompt_len})")
        _require(self.max_completion_len >= 1, "generation.max_completion_len",
                 f"must be >= 1 (got {self.max_completion_len})")
        _require(self.temperature > 0, "generation.temperature", f"must be > 0 (got {self.temperature})")
        _require(self.top_k >= 0, "generation.top_k", f"must be >= 0, 0 disables it (got {self.top_k})")
        _require(0 < self.top_p <= 1, "generation.top_p", f"must be in (0, 1] (got {self.top_p})")
        _require(0 < self.gpu_memory_utilization <= 1, "generation.gpu_memory_utilization",
                 f"must be in (0, 1] (got {self.gpu_memory_utilization})")
        _require(all(s != "" for s in self.stop), "generation.stop", "stop strings must not be empty")
        _require(all(t >= 0 for t in self.stop_token_ids), "generation.stop_token_ids",
                 f"must be token ids >= 0 (got {self.stop_token_ids})")
        _require(not (self.merge_lora and self.engine == "vllm"), "generation.merge_lora",
                 "applies to the native engine; the vLLM engine reads the adapters from its own LoRA buffers")


@dataclass
class LossConfig:
    """The clipped policy-gradient loss.

    ``loss_type``: ``grpo`` (per-sequence token mean, then batch mean), ``bnpo`` (token mean over
    the batch), ``dr_grpo`` (token sum / (batch * max_completion_len), no std scaling in Dr. GRPO's
    paper but governed here by ``scale_rewards``), ``dapo`` (token mean over the batch, decoupled
    clip). The ratio is clipped to [1 - epsilon_low, 1 + epsilon_high]. ``beta`` > 0 adds a KL
    penalty to the reference (the base model, adapter disabled). ``num_iterations`` is the number
    of optimizer updates per generated batch (> 1 is off-policy and needs the old log-probs).
    ``scale_rewards`` divides advantages by the group's reward std.

    TRL's options, under TRL's names (trl 1.16; definitions in :mod:`compilepass.kernels.grpo_loss`
    and :mod:`compilepass.standby.training.importance`): ``loss_type: cispo`` (the importance
    weight capped at ``epsilon_high`` -- a cap, TRL's epsilon_max, recommended 5.0 -- detached,
    times the log-prob; normalized as dapo). ``importance_sampling_level: sequence`` is GSPO (one
    weight per completion, the exp of its mean log-ratio; pair it with ``loss_type: grpo`` for
    GSPO's per-sequence objective). ``mask_truncated_completions`` drops completions that end
    without a stop token or stop string from the loss. ``use_bias_correction_kl`` weights the KL
    term by the importance weight (TRL's default is true, ours false).
    ``importance_sampling_correction`` (TRL: ``vllm_importance_sampling_correction``; it applies to
    whichever engine generated) weights the policy term by the truncated ratio of the trainer's to
    the engine's sampling probabilities: ``importance_sampling_mode`` token_truncate / token_mask /
    sequence_truncate / sequence_mask, bounds ``importance_sampling_clip_min`` /
    ``importance_sampling_clip_max`` (TRL: ``vllm_importance_sampling_mode``, ``..._clip_min``,
    ``..._clip_max``; its deprecated ``..._cap`` is clip_max). TRL turns it on by default with
    vLLM; ours is off by default (the native engine samples from the trainer's own weights).
    :data:`compilepass.standby.grpo.loss_options.TRL_LOSS_NAMES` maps TRL's names onto these keys.
    """

    loss_type: Literal[LOSS_TYPES] = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    num_iterations: int = 1
    scale_rewards: bool = True
    importance_sampling_level: Literal[IMPORTANCE_SAMPLING_LEVELS] = "token"
    mask_truncated_completions: bool = False
    use_bias_correction_kl: bool = False
    importance_sampling_correction: bool = False
    importance_sampling_mode: Literal[IS_MODES] = "sequence_mask"
    importance_sampling_clip_max: Optional[float] = 3.0
    importance_sampling_clip_min: Optional[float] = None

    def _validate(self) -> None:
        _require(self.epsilon_low >= 0, "loss.epsilon_low", f"must be >= 0 (got {self.epsilon_low})")
        _require(self.epsilon_low < 1, "loss.epsilon_low", f"must be < 1 (got {self.epsilon_low})")
        _require(self.epsilon_high >= 0, "loss.epsilon_high", f"must be >= 0 (got {self.epsilon_high})")
        _require(self.beta >= 0, "loss.beta", f"must be >= 0 (got {self.beta})")
        _require(self.num_iterations >= 1, "loss.num_iterations", f"must be >= 1 (got {self.num_iterations})")
        check_loss_options(self, _require)


@dataclass
class OptimConfig:
    """AdamW over the LoRA parameters and a learning-rate schedule: ``transformers.get_scheduler``
    (:mod:`~compilepass.standby.grpo.lr_schedule`: linear warmup from 0 over ``warmup_steps``, then
    ``scheduler``; cosine and linear decay to 0 at ``run.max_steps``; ``scheduler_kwargs`` are
    transformers' scheduler_specific_kwargs). ``max_grad_norm`` null disables clipping.

    ``micro_batch_size``: sequences per training forward/backward (gradients accumulate over the
    micro-batches; the loss equals the whole batch's). 0 (default) = automatic: the whole batch,
    halved on a CUDA out-of-memory until it fits."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    warmup_steps: int = 0
    scheduler: Literal[SCHEDULERS] = "constant"
    micro_batch_size: int = 0
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {min_lr_rate: 0.1} for cosine_with_min_lr

    def _validate(self) -> None:
        _require(self.micro_batch_size >= 0, "optim.micro_batch_size",
                 f"must be >= 0 (0 = automatic; got {self.micro_batch_size})")
        _require(self.lr > 0, "optim.lr", f"must be > 0 (got {self.lr})")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0 (got {self.weight_decay})")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                 f"must be two numbers in [0, 1) (got {self.betas})")
        _require(self.eps > 0, "optim.eps", f"must be > 0 (got {self.eps})")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "optim.max_grad_norm",
                 f"must be > 0 or null (got {self.max_grad_norm})")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0 (got {self.warmup_steps})")

    def make_optimizer(self, params):
        """``torch.optim.AdamW`` over ``params`` (pass only the trainable LoRA parameters)."""
        import torch

        return torch.optim.AdamW(list(params), lr=self.lr, betas=(self.betas[0], self.betas[1]), eps=self.eps,
                                 weight_decay=self.weight_decay)

    def make_scheduler(self, optimizer, max_steps: int):
        """``transformers.get_scheduler``'s ``LambdaLR`` for this schedule over ``max_steps``
        (:func:`~compilepass.standby.grpo.lr_schedule.make_lr_scheduler`). Call ``scheduler.step()``
        once per optimizer step. Its state_dict is plain data."""
        return make_lr_scheduler(self, optimizer, max_steps)


@dataclass
class DataConfig:
    """Prompts: a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.arrow`` file or a
    ``save_to_disk`` folder (its ``split`` for a DatasetDict), read through Hugging Face
    ``datasets`` (a ``prompt`` column, string or chat messages, plus any columns the rewards use), or
    ``builtin:NAME`` (see :data:`compilepass.standby.grpo.data.BUILTIN_TASKS`), generated from ``seed``
    with ``builtin_size`` examples. Each step takes ``prompts_per_step`` prompts and generates
    ``generation.num_generations`` completions for each. ``chat_template_kwargs`` go to the
    tokenizer's chat template for conversational prompts (e.g. ``{enable_thinking: false}``)."""

    dataset: str = "builtin:repeat"
    prompts_per_step: int = 8
    shuffle: bool = True
    seed: int = 0
    builtin_size: int = 1000
    split: str = "train"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def _validate(self) -> None:
        _require(self.dataset != "", "data.dataset", "must be a dataset file or folder, or builtin:NAME")
        _require(self.split != "", "data.split", "must not be empty")
        if self.dataset.startswith("builtin:"):
            name = self.dataset[len("builtin:"):]
            _require(name in BUILTIN_TASKS, "data.dataset",
                     f"unknown built-in task {name!r}; valid: {', '.join('builtin:' + n for n in BUILTIN_TASKS)}")
        _require(self.prompts_per_step >= 1, "data.prompts_per_step", f"must be >= 1 (got {self.prompts_per_step})")
        _require(self.builtin_size >= 1, "data.builtin_size", f"must be >= 1 (got {self.builtin_size})")
        _require(0 <= self.seed < 2**63, "data.seed", f"must be in [0, 2**63) (got {self.seed})")


@dataclass
class RewardSpec:
    """One reward function: a built-in name (see :data:`compilepass.standby.grpo.rewards.BUILTIN_REWARDS`)
    or ``module:function`` / ``path/to/file.py:function``, and its weight in the total."""

    name: str
    weight: float = 1.0


@dataclass
class RewardConfig:
    """``functions``: a list whose items are a name string (weight 1) or ``{name, weight}``.
    Empty means the built-in task's own rewards (an error for any other dataset). A reward is
    called with keywords, as TRL calls it (see :mod:`compilepass.standby.grpo.rewards`)."""

    functions: list[RewardSpec] = field(default_factory=list)

    def _validate(self) -> None:
        names = [s.name for s in self.functions]
        for i, spec in enumerate(self.functions):
            key = f"reward.functions[{i}]"
            _require(spec.name != "", key, "name must not be empty")
            _require(math.isfinite(spec.weight), key, f"weight must be finite (got {spec.weight})")
            if ":" not in spec.name:
                _require(spec.name in BUILTIN_REWARDS, key,
                         f"unknown reward {spec.name!r}; valid: {', '.join(BUILTIN_REWARDS)} or module:function")
            _require(names.count(spec.name) == 1, key, f"reward {spec.name!r} is listed twice")


@dataclass
class RunConfig:
    """Where and how long. ``save_every`` 0 saves only at the end. ``keep_last`` checkpoints are
    kept. ``resume``: ``auto`` (the latest checkpoint in output_dir if any), ``never`` (start over;
    refuses an output_dir that already holds checkpoints) or a checkpoint path.

    Logging and outputs: ``report_to`` names trackers (:mod:`~compilepass.standby.grpo.trackers`);
    ``logging_steps`` (TRL's name) replaces ``log_every`` when set; ``log_entropy`` logs the
    policy's entropy; after the last step the final adapter goes into ``output_dir`` and, with
    ``save_merged``, the merged model into ``output_dir/merged``
    (:mod:`~compilepass.standby.grpo.outputs`)."""

    output_dir: str = "runs/grpo"
    max_steps: int = 100
    seed: int = 0
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 3
    tensorboard: bool = False
    resume: str = "auto"
    device: str = "auto"  # "auto": cuda if available, else cpu
    device_memory_gib: Optional[float] = None  # run as on an N GiB card (DeviceMemoryCap); None: the whole GPU
    # logging and outputs (compilepass.standby.grpo.trackers / outputs)
    report_to: Union[str, list[str]] = field(default_factory=list)  # tensorboard / wandb / trackio / none / all
    logging_steps: Optional[int] = None  # TRL's name for log_every; when set, it is the one used
    log_entropy: bool = True  # the policy's entropy over completion tokens (from the log-prob kernel's pass, no grad)
    save_merged: bool = False  # also write output_dir/merged: the adapter merged into the base (plain HF)

    def _validate(self) -> None:
        _require(self.output_dir != "", "run.output_dir", "must not be empty")
        _require(self.max_steps >= 1, "run.max_steps", f"must be >= 1 (got {self.max_steps})")
        _require(0 <= self.seed < 2**63, "run.seed", f"must be in [0, 2**63) (got {self.seed})")
        _require(self.device_memory_gib is None or (math.isfinite(self.device_memory_gib) and self.device_memory_gib > 0),
                 "run.device_memory_gib", f"must be > 0 GiB or null (got {self.device_memory_gib})")
        _require(self.log_every >= 1, "run.log_every", f"must be >= 1 (got {self.log_every})")
        _require(self.save_every >= 0, "run.save_every", f"must be >= 0, 0 saves only at the end (got {self.save_every})")
        _require(self.keep_last >= 1, "run.keep_last", f"must be >= 1 (got {self.keep_last})")
        _require(self.resume != "", "run.resume", "must be auto, never or a checkpoint path")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 "run.device", f"must be auto, cpu or cuda[:N] (got {self.device!r})")
        _require(self.logging_steps is None or self.logging_steps >= 1, "run.logging_steps",
                 f"must be >= 1 or null (got {self.logging_steps})")
        if self.logging_steps is not None:
            self.log_every = self.logging_steps
        self.report_to = check_report_to(self.report_to)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "generation": GenerationConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "reward": RewardConfig,
    "run": RunConfig,
}


@dataclass
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, str, numbers, bools, None), JSON- and YAML-serializable."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "GRPOConfig":
        """Build and validate from a ``to_dict()``-shaped mapping (sections may be missing)."""
        return _from_mapping(data, source)

    def validate(self, *, rewards_given: bool = False) -> "GRPOConfig":
        """Check every value's type (converting as the loaders do: an integer for a float key, a
        name or ``{name, weight}`` for a reward), its range and the cross-section rules; raises
        ConfigError. Returns self. ``rewards_given``: the reward functions come from Python
        (``GRPOTrainer(..., reward_funcs=...)``), so an empty ``reward.functions`` is fine."""
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise ConfigError(f"'{name}' must be a {cls.__name__} (got {type(section).__name__})")
            _check_types(section, name)
            section._validate()
        if not self.reward.functions and not rewards_given:
            _require(self.data.dataset.startswith("builtin:"), "reward.functions",
                     "is empty; a JSONL dataset needs at least one reward function "
                     "(as does any dataset but builtin:NAME)")
        return self


# ------------------------------------------------------------------------------------------------
# Built-in configs


def _tiny_config() -> GRPOConfig:
    """The tiny random-weight preset learning the built-in ``repeat`` task on CPU in a few minutes."""
    return GRPOConfig(
        model=ModelConfig(name_or_path="tiny", dtype="float32", lora_rank=8, lora_alpha=16,
                          gradient_checkpointing=False, init_std=0.15),
        generation=GenerationConfig(num_generations=8, max_prompt_len=32, max_completion_len=8,
                                    temperature=1.0),
        loss=LossConfig(loss_type="grpo"),
        optim=OptimConfig(lr=2e-3, max_grad_norm=1.0, warmup_steps=0, scheduler="constant"),
        data=DataConfig(dataset="builtin:repeat", prompts_per_step=8, shuffle=True, seed=0, builtin_size=256),
        reward=RewardConfig(functions=[RewardSpec("repeat_letter", 1.0)]),
        run=RunConfig(output_dir="runs/grpo-tiny", max_steps=50, seed=0, log_every=1, save_every=25,
                      device="cpu"),
    )


DEFAULT_CONFIGS = {"tiny": _tiny_config}


def default_config(name: str = "tiny") -> GRPOConfig:
    """A built-in config. ``tiny``: the tiny preset on ``builtin:repeat``, CPU, 50 steps."""
    if name not in DEFAULT_CONFIGS:
        raise ConfigError(f"unknown default config {name!r}; valid: {', '.join(DEFAULT_CONFIGS)}")
    return DEFAULT_CONFIGS[name]().validate()


# ------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                base: GRPOConfig | None = None) -> GRPOConfig:
    """Read ``path`` (YAML or TOML; None: start from ``base`` or the dataclass defaults), apply
    ``section.key=value`` overrides in order, validate, return the config.

    Raises ConfigError (one line) for a missing or unparsable file, an unknown section or key, a
    value of the wrong type or out of range, or a malformed override.
    """
    if path is None:
        data = (base or GRPOConfig()).to_dict()
        source = "config"
    else:
        data = read_config_file(path)
        source = str(path)
        if base is not None:
            data = _merge(base.to_dict(), data)
    data = apply_overrides(data, overrides)
    return _from_mapping(data, source)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a YAML or TOML file; ConfigError names the file (and line) on failure."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found" if not p.exists() else f"config path {str(p)!r} is not a file")
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e}") from None
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    elif suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None  # the message carries "(at line L, column C)"
    else:
        raise ConfigError(f"config file {str(p)!r}: unknown format {suffix or '(no suffix)'!r}; use .yaml, .yml or .toml")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections ({', '.join(SECTIONS)}), "
                          f"not {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config mapping (a new dict is returned)."""
    import yaml

    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or key.count(".") != 1:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-4)")
        section, name = key.split(".")
        if section not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
        valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if name not in valid:
            raise ConfigError(f"override {item!r}: unknown key {key!r}; valid keys of {section}: {', '.join(valid)}")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value: {getattr(e, 'problem', e)}") from None
        sec = out.get(section)
        if sec is None:
            sec = {}
        elif not isinstance(sec, dict):
            raise ConfigError(f"section {section!r} must be a mapping, not {type(sec).__name__}")
        sec = dict(sec)
        sec[name] = value
        out[section] = sec
    return out


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _from_mapping(data: dict[str, Any], source: str) -> GRPOConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix(source)}the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    sections = {}
    for section, value in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{prefix(source)}unknown section {section!r}; valid: {', '.join(SECTIONS)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{prefix(source)}section {section!r} must be a mapping, not {type(value).__name__}")
        sections[section] = _build_section(SECTIONS[section], section, value, source)
    try:
        return GRPOConfig(**sections).validate()
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if source == "config" else f"{prefix(source)}{msg}") from None


def _build_section(cls: type, section: str, values: dict, source: str):
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in valid:
            raise ConfigError(f"{prefix(source)}unknown key '{section}.{key}'; valid keys of {section}: {', '.join(valid)}")
        if section == "reward" and key == "functions":
            kwargs[key] = _reward_specs(value, source)
        else:
            kwargs[key] = coerce(value, hints[key], f"{section}.{key}", source)
    return cls(**kwargs)


def _check_types(section, name: str) -> None:
    """Each field of a section object through :func:`coerce` (values stored back converted)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if name == "reward" and f.name == "functions":
            value = _reward_specs(value, "config")
        else:
            value = coerce(value, hints[f.name], f"{name}.{f.name}", "config")
        setattr(section, f.name, value)


def _reward_specs(value: Any, source: str) -> list[RewardSpec]:
    if isinstance(value, (str, dict, RewardSpec)):
        value = [value]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise ConfigError(f"{prefix(source)}'reward.functions' must be a list of names or {{name, weight}} mappings")
    specs = []
    for i, item in enumerate(value):
        key = f"reward.functions[{i}]"
        if isinstance(item, RewardSpec):
            specs.append(RewardSpec(coerce(item.name, str, key + ".name", source),
                                    coerce(item.weight, float, key + ".weight", source)))
        elif isinstance(item, str):
            specs.append(RewardSpec(item, 1.0))
        elif isinstance(item, dict):
            unknown = set(item) - {"name", "weight"}
            if unknown or "name" not in item:
                raise ConfigError(f"{prefix(source)}'{key}' must have a 'name' and optionally a 'weight' (got keys {sorted(item)})")
            specs.append(RewardSpec(coerce(item["name"], str, key + ".name", source),
                                    coerce(item.get("weight", 1.0), float, key + ".weight", source)))
        else:
            raise ConfigError(f"{prefix(source)}'{key}' must be a name or a {{name, weight}} mapping, not {type(item).__name__}")
    return specs


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {message}")

"""The standby GRPO loop: generate with the trainer's own model, score, and update the LoRA adapter.

``GRPOTrainer(config).train()`` (or :func:`run_grpo`) runs ``run.max_steps`` steps. One step::

    prompts   <- PromptBatcher (prompts_per_step examples; its position is checkpointed)
    engine.wake(); generate G completions per prompt (seed derived from (run.seed, step)); engine.sleep()
    rewards   <- RewardSet.score(decoded completions)      (RewardError: save state, re-raise)
    advantages = (r - group mean) / (group std + 1e-4)   (or r - mean when loss.scale_rewards is false)
    logp      <- model body -> last hidden states -> selective_log_softmax on completion positions only
    old_logp  <- logp.detach() (num_iterations == 1) or one no-grad pass before the updates
    ref_logp  <- the same with the adapter disabled (beta > 0 only)
    loss      <- grpo_loss(...); backward (micro-batches: gradient accumulation); clip; optimizer.step(); scheduler.step()
    metrics.jsonl, progress bar; checkpoint every run.save_every steps and at the end

One copy of the weights: :class:`~compilepass.standby.engine.RolloutEngine` decodes with the peft
model's own modules; its KV cache lives in a standby region that sleeps while training runs.
``generation.engine=vllm`` uses :class:`~compilepass.standby.vllm_engine.VllmEngine` instead: vLLM
in this process, the trainer's base weights views of vLLM's, the LoRA tensors pushed into vLLM's
LoRA buffers before each generation, only the KV cache released by ``sleep()``.

Reproducibility: every source of randomness is either derived from ``(run.seed, step)`` (the
sampling generator) or checkpointed (adapter, optimizer, scheduler, data position, RNG states);
dropout is 0. A run killed after its step-k checkpoint and resumed with ``run.resume=auto``
logs the same metrics for steps > k as an uninterrupted run on the same machine.

Failures (each a :class:`~compilepass.errors.CompilepassError`: one line from the CLI, exit 2):
a reward function raising (:class:`~compilepass.standby.rewards.RewardError`) or running out of
memory (:class:`TrainingOutOfMemoryError`) first saves the state as of the start of the failing
step (checkpoint ``step-<last completed step>``), so ``resume=auto`` retries that step.

Training memory without tuning: ``optim.micro_batch_size=0`` (the default) runs the whole batch
in one forward/backward and, on a CUDA out-of-memory, halves the sequences per forward (gradients
accumulated over the micro-batches; the loss is scaled so the sum equals the whole batch's) until
it fits; the token count that fitted is kept for later steps. A fixed size is used as given.

Test hooks: ``COMPILEPASS_SIMULATE_OOM=generate|train`` (optionally ``...:STEP``, default step 1)
raises ``torch.OutOfMemoryError`` in that phase, to exercise the out-of-memory path on CPU;
``COMPILEPASS_SIMULATE_OOM=rows>N`` raises it for any training forward over more than N sequences.

CPU: the trainer turns on ``torch.set_flush_denormal(True)`` when it is built (before the model,
so that worker threads created later inherit it) until :meth:`GRPOTrainer.close` (back to
torch's default, off): float32 denormals made single tiny-preset steps up to 70x slower
(0.15 s -> 10 s) once the policy sharpened.

Compilation: on CUDA the engine uses ``compile_options="auto"`` (the tuning database's flags);
on CPU it runs the decode step eagerly (``compile_options=False``): for the tiny CPU preset
Inductor's compile time would dominate the run (tens of seconds versus ~0.1 s per step).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from compilepass.errors import CompilepassError, ConfigError
from compilepass.standby.grpo_config import GRPOConfig

log = logging.getLogger(__name__)

__all__ = ["GRPOTrainer", "run_grpo", "TrainingOutOfMemoryError", "KVMemoryError", "policy_logprobs",
           "group_advantages", "step_seed", "SIMULATE_OOM_ENV", "RESULT_AFFECTING_KEYS"]

SIMULATE_OOM_ENV = "COMPILEPASS_SIMULATE_OOM"

#: Config keys that do not change a run's results: a resume may change them freely.
#: (``run.max_steps`` changes the cosine/linear schedule's horizon: a change is warned about.)
_FREE_KEYS = {"run.output_dir", "run.log_every", "run.save_every", "run.keep_last", "run.tensorboard",
              "run.resume", "run.max_steps", "generation.gpu_memory_utilization", "generation.standby"}
#: Config keys whose change is warned about on resume but not refused (numerics differ slightly).
_WARN_KEYS = {"run.max_steps", "run.device", "generation.engine", "model.gradient_checkpointing",
              "model.offload_activations", "optim.micro_batch_size"}
RESULT_AFFECTING_KEYS = "every key except " + ", ".join(sorted(_FREE_KEYS | _WARN_KEYS))


class TrainingOutOfMemoryError(CompilepassError):
    """Generation or the training step ran out of memory (the state was saved first)."""


class KVMemoryError(CompilepassError):
    """The engine's KV region does not fit in ``gpu_memory_utilization`` of the free GPU memory."""


def plan_kv_batch(shape, dtype, batch: int, max_len: int, free: int, total: int, utilization: float,
                  reserve: int = 0) -> int:
    """How many sequences the engine decodes at once: all ``batch`` when their KV cache fits in
    ``utilization`` x (the free device memory - ``reserve``), else as many as fit (the engine then
    generates in chunks of that many, logged). ``reserve``: bytes that training will hold across
    the wake that follows it (the LoRA gradients and optimizer state, allocated at the first step,
    after this plan). Raises KVMemoryError when not even one sequence fits."""
    from compilepass.standby.engine import kv_cache_specs
    from compilepass.standby.memory import required_bytes

    def need(b: int) -> int:
        return required_bytes(kv_cache_specs(shape, b, max_len, dtype))

    budget = max(free - reserve, 0) * utilization
    full = need(batch)
    if full <= budget:
        return batch
    fit = min(batch - 1, int(budget // max(need(1), 1)))
    while fit >= 1 and need(fit) > budget:
        fit -= 1
    held = f" - {_fmt_gib(reserve)} kept for the LoRA gradients and optimizer state" if reserve else ""
    where = (f"{_fmt_gib(budget)} is available ({utilization:g} x ({_fmt_gib(free)} free of {_fmt_gib(total)}"
             f"{held}))")
    if fit < 1:
        raise KVMemoryError(
            f"the KV cache of one sequence of {max_len} tokens (max_prompt_len + max_completion_len) needs "
            f"{_fmt_gib(need(1))} but {where}; lower generation.max_completion_len or generation.max_prompt_len")
    log.warning("the KV cache of all %d sequences (prompts_per_step x num_generations) needs %s but %s: "
                "generating %d sequences at a time", batch, _fmt_gib(full), where, fit)
    return fit


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of ``step`` (1-based) of a run seeded ``seed``: a resumed run reuses it."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2**62)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> tuple[torch.Tensor, int]:
    """(advantages [N], number of groups whose rewards are all equal) for N = groups * group_size
    rewards laid out group by group. ``scale``: divide by the group's std (+1e-4)."""
    r = rewards.float().view(-1, group_size)
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = r - mean
    if scale:
        adv = adv / (std + 1e-4)
    zero = int(((r.max(1).values - r.min(1).values).abs() <= 1e-12).sum())
    return adv.reshape(-1), zero


def enable_checkpointing(causal_lm, reentrant: bool = False) -> None:
    """Gradient (activation) checkpointing of every decoder layer. Non-reentrant by default (the
    inputs need no ``requires_grad``); ``reentrant=True`` for activation offload, whose hooks see
    only what a reentrant checkpoint saves (see :mod:`compilepass.standby.offload`).
    ``enable_input_require_grads`` makes the reentrant form see a graph to differentiate."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_*
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": bool(reentrant)})
        if hasattr(causal_lm, "enable_input_require_grads"):
            causal_lm.enable_input_require_grads()


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def policy_logprobs(model, prompts: Sequence[Sequence[int]], completion_ids: torch.Tensor,
                    completion_mask: torch.Tensor, temperature: float = 1.0, pad_token_id: int = 0) -> torch.Tensor:
    """Per-token log-probs [B, N] (float32, 0 where the mask is 0) of ``completion_ids`` [B, N]
    after ``prompts`` (B token lists), under ``model`` (a peft model or a causal LM).

    Runs the model *body* (``causal_lm.model``) over prompt + completion, right-padded, and applies
    :func:`compilepass.kernels.selective_log_softmax` to the hidden states at the completion
    positions only: the [tokens x vocab] logits never exist. Gradients flow when enabled.

    No attention mask is passed: each row is its prompt, then its completion, then padding, so
    the causal mask alone is exact for every real position (none of them can see a later pad),
    and the padded positions' outputs are multiplied by the zero mask. Without a padding mask
    transformers uses SDPA's causal kernels instead of materializing a [B, 1, T, T] mask
    (B GiB at T = 32k).
    """
    from compilepass.kernels import selective_log_softmax

    causal_lm = _causal_lm(model)
    device = completion_ids.device
    B, N = completion_ids.shape
    plen = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    T = int(plen.max()) + N
    input_ids = torch.full((B, T), int(pad_token_id), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    input_ids, plen_d = input_ids.to(device), plen.to(device)
    pos = plen_d[:, None] + torch.arange(N, device=device)[None, :]  # where completion token t sits
    input_ids.scatter_(1, pos, completion_ids.long())
    hidden = causal_lm.model(input_ids=input_ids, use_cache=False).last_hidden_state
    idx = (pos - 1).clamp_min(0)  # hidden state at position i predicts token i + 1
    h = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
    logp = selective_log_softmax(h, causal_lm.lm_head.weight, completion_ids.long(), temperature)
    return logp * completion_mask.to(logp.dtype)


def _simulated_oom(phase: str, step: int) -> None:
    value = os.environ.get(SIMULATE_OOM_ENV, "").strip()
    if not value:
        return
    what, _, at = value.partition(":")
    if what == phase and step == (int(at) if at else 1):
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 1.50 GiB (simulated by {SIMULATE_OOM_ENV}={value})")


def _simulated_oom_rows(rows: int) -> None:
    """``COMPILEPASS_SIMULATE_OOM=rows>N``: an out-of-memory for any training forward over more
    than N sequences (exercises the automatic micro-batch size on CPU)."""
    value = os.environ.get(SIMULATE_OOM_ENV, "").strip()
    if value.startswith("rows>") and rows > int(value[5:]):
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (simulated: {rows} rows > "
                                     f"{value[5:]})")


_TRIED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")


def _fmt_gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class _StepState:
    """What a failing step needs to save the state as of its start."""

    step: int
    data_state: dict


@dataclass
class GRPOSummary:
    """What :meth:`GRPOTrainer.train` returns."""

    output_dir: str
    start_step: int
    steps_done: int
    final_step: int
    last_checkpoint: Optional[str]
    wall_s: float
    metrics: list[dict] = field(default_factory=list)  # the records logged by this call

    def reward_means(self) -> list[float]:
        return [float(m["reward"]) for m in self.metrics]

    def to_dict(self) -> dict:
        return {"output_dir": self.output_dir, "start_step": self.start_step, "steps_done": self.steps_done,
                "final_step": self.final_step, "last_checkpoint": self.last_checkpoint, "wall_s": self.wall_s,
                "last_metrics": self.metrics[-1] if self.metrics else None}


class GRPOTrainer:
    """GRPO on one device with one copy of the weights.

    ``GRPOTrainer(config, progress="auto", on_step=None)``: builds the tokenizer, dataset,
    rewards, model (+ LoRA), optimizer, scheduler and rollout engine, and resumes per
    ``run.resume``. Every user error (unknown model, bad dataset or reward, incompatible
    checkpoint, KV region that cannot fit) is raised here, before any step. ``train()`` runs the
    remaining steps and returns a :class:`GRPOSummary`. ``on_step(step, record)`` is called after
    each logged step. ``compile_options`` overrides the engine's (default: "auto" on CUDA, eager
    on CPU).
    """

    def __init__(self, config: GRPOConfig, *, progress: bool | str = "auto",
                 on_step: Optional[Callable[[int, dict], None]] = None, compile_options: Any = "default"):
        from compilepass.standby.checkpoint import find_latest, list_checkpoints
        from compilepass.standby.data import PromptBatcher, load_dataset, load_tokenizer
        from compilepass.standby.models import add_lora, build_model
        from compilepass.standby.rewards import RewardSet

        self.config = config.validate()
        c = self.config
        self.progress = progress
        self.on_step = on_step
        self.output_dir = Path(c.run.output_dir)
        if c.generation.engine == "vllm":  # vLLM missing or a refused version: one line, before any work
            from compilepass.standby.vllm_engine import check_vllm

            check_vllm()
        self.device = self._resolve_device(c.run.device)
        # Before any thread pool exists where possible: worker threads inherit the calling thread's FP mode.
        self._flush_denormal = self.device.type == "cpu" and torch.set_flush_denormal(True)
        self.tokenizer = load_tokenizer(c.model.name_or_path)
        self.dataset = load_dataset(c.data.dataset, seed=c.data.seed, builtin_size=c.data.builtin_size)
        self.rewards = RewardSet.from_specs(c.reward.functions, default=self.dataset.default_rewards)
        self.batcher = PromptBatcher(self.dataset, c.data.prompts_per_step, shuffle=c.data.shuffle, seed=c.data.seed)

        # Where to start: decided before building anything expensive.
        resume_from: Optional[Path] = None
        if c.run.resume == "auto":
            resume_from = find_latest(self.output_dir)
        elif c.run.resume == "never":
            if list_checkpoints(self.output_dir):
                raise ConfigError(f"run.resume is 'never' but {str(self.output_dir)!r} already holds checkpoints; "
                                  f"use run.resume=auto to continue, or another run.output_dir")
        else:
            from compilepass.standby.checkpoint import resolve_checkpoint

            resume_from = resolve_checkpoint(c.run.resume)
        if resume_from is not None:
            self._check_resume_config(resume_from)

        torch.manual_seed(c.run.seed)
        dtype = c.model.torch_dtype
        model = build_model(c.model.name_or_path, dtype=dtype, device=self.device, seed=c.run.seed)
        c.model.reinit_preset_weights(model, seed=c.run.seed)
        self.model = add_lora(model, rank=c.model.lora_rank, alpha=c.model.lora_alpha,
                              targets=tuple(c.model.lora_targets), seed=c.run.seed, dropout=0.0)
        self.causal_lm = _causal_lm(self.model)
        self._disable_dropout()
        if c.model.gradient_checkpointing:
            enable_checkpointing(self.causal_lm, reentrant=c.model.offload_activations)
        if c.model.mlp_chunk_tokens:
            from compilepass.standby.train_memory import tile_mlp

            tile_mlp(self.causal_lm, c.model.mlp_chunk_tokens)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = c.optim.make_optimizer(self.params)
        self.scheduler = c.optim.make_scheduler(self.optimizer, c.run.max_steps)

        self._fit_tokens: Optional[int] = None  # tokens per training forward known to fit (auto micro-batch)
        self._oom_micro: Optional[int] = None  # sequences per forward when training ran out of memory
        self.step = 0
        self.resumed_from: Optional[Path] = None
        if resume_from is not None:
            from compilepass.standby.checkpoint import load_checkpoint

            state = load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler)
            if state.data_state is not None:
                self.batcher.load_state_dict(state.data_state)
            self.step = state.step
            # the automatic micro-batch size learned before the kill: the same splits as an uninterrupted run
            self._fit_tokens = state.extra.get("fit_tokens")
            self.resumed_from = state.path
            log.info("resumed from %s (step %d)", state.path, state.step)

        self.engine = self._build_engine(compile_options)
        if c.generation.standby:
            self.engine.sleep()  # training owns the memory until the first generation
        self._metrics_logger = None
        self.last_checkpoint: Optional[Path] = self.resumed_from

    # -- setup -------------------------------------------------------------------------------------

    @staticmethod
    def _resolve_device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"run.device is {name!r} but CUDA is not available here (use run.device=cpu or auto)")
        return dev

    def _disable_dropout(self) -> None:
        for m in self.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        cfg = getattr(self.causal_lm, "config", None)
        for key in ("attention_dropout", "hidden_dropout", "dropout"):
            if cfg is not None and getattr(cfg, key, 0):
                setattr(cfg, key, 0.0)

    def _check_resume_config(self, path: Path) -> None:
        import json

        from compilepass.standby.checkpoint import META_FILE

        try:
            saved = json.loads((path / META_FILE).read_text()).get("config")
        except (OSError, ValueError):
            saved = None
        if not saved:
            log.warning("checkpoint %s holds no config; cannot check that it matches this run", path)
            return
        now = self.config.to_dict()
        refused, warned = [], []
        for section, values in now.items():
            old_sec = saved.get(section) or {}
            for key, value in values.items():
                name = f"{section}.{key}"
                if key not in old_sec or old_sec[key] == value or name in _FREE_KEYS - _WARN_KEYS:
                    continue
                (warned if name in _WARN_KEYS else refused).append(f"{name} {old_sec[key]!r} -> {value!r}")
        if refused:
            raise ConfigError(f"cannot resume from {path}: the config changed in keys that change results "
                              f"({'; '.join(refused[:4])}{' ...' if len(refused) > 4 else ''}); restore them or "
                              f"use another run.output_dir")
        for w in warned:
            log.warning("resuming %s with a changed config: %s", path, w)

    def _build_engine(self, compile_options):
        from compilepass.standby.engine import RolloutEngine
        from compilepass.standby.models import ModelShape

        c = self.config
        max_batch = c.data.prompts_per_step * c.generation.num_generations
        max_len = c.generation.max_prompt_len + c.generation.max_completion_len
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # after the first step, the LoRA gradients and AdamW's two moments stay allocated across wakes
            reserve = 3 * sum(p.numel() * p.element_size() for p in self.params)
            max_batch = plan_kv_batch(ModelShape.from_hf_config(self.causal_lm.config), c.model.torch_dtype,
                                      max_batch, max_len, free, total, c.generation.gpu_memory_utilization,
                                      reserve=reserve)
        if compile_options == "default":
            compile_options = "auto" if self.device.type == "cuda" else False
        pad = self.tokenizer.pad_token_id
        if c.generation.engine == "vllm":
            from compilepass.standby.vllm_engine import VllmEngine

            # vLLM loads the weights, then the trainer's base parameters become views of vLLM's tensors.
            return VllmEngine(self.model, max_batch=max_batch, max_len=max_len, compile_options=compile_options,
                              pad_token_id=pad if pad is not None and pad < self.engine_vocab() else 0,
                              seed=c.run.seed, gpu_memory_utilization=c.generation.gpu_memory_utilization)
        return RolloutEngine(self.model, max_batch=max_batch, max_len=max_len, compile_options=compile_options,
                             pad_token_id=pad if pad is not None and pad < self.engine_vocab() else 0)

    def engine_vocab(self) -> int:
        return int(self.causal_lm.config.vocab_size)

    # -- state -------------------------------------------------------------------------------------

    def save(self, step: int, data_state: Optional[dict] = None) -> Path:
        """Checkpoint the adapter, optimizer, scheduler, RNG states and data position as ``step``."""
        from compilepass.standby.checkpoint import capture_rng_state, save_checkpoint

        tail = self._metrics_logger.tail(5) if self._metrics_logger is not None else []
        path = save_checkpoint(self.output_dir, step, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, rng_states=capture_rng_state(),
                               data_state=data_state if data_state is not None else self.batcher.state_dict(),
                               config_dict=self.config.to_dict(), metrics_tail=tail,
                               keep_last=self.config.run.keep_last,
                               extra={"fit_tokens": self._fit_tokens})
        self.last_checkpoint = path
        return path

    def _save_after_failure(self, st: _StepState) -> Optional[Path]:
        """Save the state as of the start of the failing step; never mask the original error."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            return self.save(st.step - 1, data_state=st.data_state)
        except Exception as e:  # noqa: BLE001
            log.error("could not save the state after the failure: %s", e)
            return None

    # -- one step ----------------------------------------------------------------------------------

    def _tokenize(self, examples) -> list[list[int]]:
        c = self.config
        out = []
        for ex in examples:
            ids = self.tokenizer.encode(ex.prompt, add_special_tokens=hasattr(self.tokenizer, "hf"))
            if not ids:
                raise ConfigError(f"prompt {ex.prompt!r} tokenizes to nothing")
            if len(ids) > c.generation.max_prompt_len:
                ids = ids[-c.generation.max_prompt_len:]  # keep the end, where the question is
            out.append(ids)
        return out

    def _apply_stop_strings(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cut each completion after the first stop string (``generation.stop``): a new mask."""
        stops = self.config.generation.stop
        if not stops:
            return mask
        mask = mask.clone()
        lengths = mask.sum(1).tolist()
        rows = ids.tolist()
        for b, (row, n) in enumerate(zip(rows, lengths)):
            text = self.tokenizer.decode(row[:n])
            if not any(s in text for s in stops):
                continue
            for k in range(1, n + 1):
                if any(s in self.tokenizer.decode(row[:k]) for s in stops):
                    mask[b, k:] = 0
                    break
        return mask

    def _generate(self, step: int, prompt_ids: list[list[int]]):
        c, g = self.config, self.config.generation
        _simulated_oom("generate", step)
        eos = self.tokenizer.eos_token_id
        self.engine.wake()
        try:
            out = self.engine.generate(prompt_ids, max_new_tokens=g.max_completion_len, temperature=g.temperature,
                                       top_k=g.top_k, top_p=g.top_p, eos_token_id=eos,
                                       stop_token_ids=g.stop_token_ids or None, seed=step_seed(c.run.seed, step))
        finally:
            if g.standby:
                self.engine.sleep()
        return out

    def _activation_offload(self):
        """The offload hooks for the training forward (model.offload_activations), else a no-op."""
        if not self.config.model.offload_activations:
            return contextlib.nullcontext()
        from compilepass.standby.offload import ActivationOffload

        return ActivationOffload(self.model.parameters(), device=self.device)

    def _micro_batch_size(self, rows: int, width: int) -> int:
        """Sequences per forward for a batch of ``rows`` x ``width`` tokens: ``optim.micro_batch_size``
        when set, else (auto) the whole batch until an out-of-memory taught a smaller token count."""
        fixed = self.config.optim.micro_batch_size
        if fixed:
            return min(rows, fixed)
        if self._fit_tokens is None:
            return rows
        return max(1, min(rows, self._fit_tokens // max(width, 1)))

    def _fit_micro(self, rows: int, width: int, what: str, run: Callable[[int], Any]) -> Any:
        """``run(size)`` with the micro-batch size; in auto mode a CUDA out-of-memory halves the size
        (down to one sequence) and ``run`` is called again from scratch (gradients zeroed first).
        The size that fits is remembered as a token count, so later steps start from it."""
        size = self._micro_batch_size(rows, width)
        while True:
            try:
                return run(size)
            except torch.OutOfMemoryError:
                if self.config.optim.micro_batch_size or size == 1:
                    self._oom_micro = size  # named in the out-of-memory message
                    raise
            # only after an out-of-memory: retried here, outside the handler, once the traceback's tensors are gone
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)  # the step's peak: the attempt that fit
            new = (size + 1) // 2
            log.warning("%s: out of memory with %d sequences (%d tokens) per forward; retrying with %d "
                        "(automatic micro-batch; optim.micro_batch_size=N fixes it)", what, size, size * width, new)
            self._fit_tokens = new * width
            size = new

    def _slice_logprobs(self, sl: slice, prompt_ids, completion_ids, mask) -> torch.Tensor:
        """Per-token log-probs of rows ``sl`` (one training-side forward; gradients as enabled)."""
        _simulated_oom_rows(completion_ids[sl].shape[0])
        return policy_logprobs(self.model, prompt_ids[sl], completion_ids[sl], mask[sl],
                               self.config.generation.temperature, self.engine.pad_token_id)

    def _logprobs_in_micro_batches(self, size: int, prompt_ids, completion_ids, mask) -> torch.Tensor:
        """No-grad per-token log-probs of the whole batch, ``size`` sequences at a time."""
        return torch.cat([self._slice_logprobs(slice(lo, lo + size), prompt_ids, completion_ids, mask)
                          for lo in range(0, completion_ids.shape[0], size)])

    def _train(self, step: int, prompt_ids, completion_ids, mask, advantages) -> dict:
        from compilepass.standby.train_memory import lora_mixed_precision

        c, lc = self.config, self.config.loss
        _simulated_oom("train", step)
        rows = completion_ids.shape[0]
        width = max(len(p) for p in prompt_ids) + completion_ids.shape[1]
        def logprobs(size: int) -> torch.Tensor:
            return self._logprobs_in_micro_batches(size, prompt_ids, completion_ids, mask)

        ref = old = None
        if lc.beta > 0:
            with torch.no_grad(), self.model.disable_adapter():
                ref = self._fit_micro(rows, width, "reference log-probs", logprobs)
        if lc.num_iterations > 1:
            with torch.no_grad():
                old = self._fit_micro(rows, width, "old-policy log-probs", logprobs)
        n_items = mask.sum()
        sums: dict[str, float] = {}
        grad_norm = float("nan")
        for _ in range(lc.num_iterations):
            def accumulate(size: int) -> dict[str, torch.Tensor]:
                acc: dict[str, torch.Tensor] = {}
                for lo in range(0, rows, size):
                    sl = slice(lo, lo + size)
                    # forward and backward (which recomputes checkpointed layers) under one precision setting
                    with lora_mixed_precision(self.model):
                        with self._activation_offload():
                            logp = self._slice_logprobs(sl, prompt_ids, completion_ids, mask)
                        loss, m = self._micro_loss(logp, old, ref, advantages, mask, n_items, sl)
                        loss.backward()
                    frac = mask[sl].sum() / n_items.clamp(min=1)  # token-mean metrics combine by token share
                    acc["loss"] = acc.get("loss", 0.0) + loss.detach()
                    for k, v in m.items():
                        acc[k] = acc.get(k, 0.0) + v.detach() * frac
                return acc

            acc = self._fit_micro(rows, width, "training", accumulate)
            if c.optim.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, c.optim.max_grad_norm))
            else:
                grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for k, v in acc.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.scheduler.step()
        out = {k: v / lc.num_iterations for k, v in sums.items()}
        out.setdefault("kl", 0.0)
        out["grad_norm"] = grad_norm
        return out

    def _micro_loss(self, logp, old, ref, advantages, mask, n_items, sl: slice):
        """The loss of rows ``sl``, scaled so that the micro-batches' losses sum to the whole batch's
        (same value, same gradient, up to summation order): per-row means (grpo, dr_grpo) weigh by
        the rows' share, the batch token mean (bnpo) by the tokens' share; dapo already divides by
        the whole batch's token count."""
        from compilepass.kernels import grpo_loss

        c, lc = self.config, self.config.loss
        m_mask = mask[sl]
        loss, metrics = grpo_loss(logp, old[sl] if old is not None else logp.detach(),
                                  ref[sl] if ref is not None else None, advantages[sl], m_mask,
                                  epsilon_low=lc.epsilon_low, epsilon_high=lc.epsilon_high, beta=lc.beta,
                                  loss_type=lc.loss_type, max_completion_length=c.generation.max_completion_len,
                                  num_items_in_batch=n_items)
        rows, m_rows = mask.shape[0], m_mask.shape[0]
        if m_rows == rows:
            return loss, metrics
        if lc.loss_type in ("grpo", "dr_grpo"):
            loss = loss * (m_rows / rows)
        elif lc.loss_type == "bnpo":
            loss = loss * (m_mask.sum().clamp(min=1) / n_items.clamp(min=1))
        return loss, metrics

    def _oom(self, phase: str, st: _StepState, err: BaseException) -> TrainingOutOfMemoryError:
        c = self.config
        text = str(err)
        tried = _TRIED.search(text)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            _, total = torch.cuda.mem_get_info(self.device)
            measured = f"peak allocated {_fmt_gib(peak)} of {_fmt_gib(total)}"
        else:
            from compilepass.standby.metrics import peak_memory_gib

            measured = f"peak resident {peak_memory_gib():.2f} GiB"
        need = f"tried to allocate {tried.group(1)} more, {measured}" if tried else measured
        if getattr(err, "needed", None):  # StandbyMemoryError: waking the KV region failed
            free = getattr(err, "free", None)
            need = (f"waking the KV region needs {_fmt_gib(err.needed)}"
                    + (f", {_fmt_gib(free)} free" if free is not None else "") + f"; {measured}")
        saved = self._save_after_failure(st)
        where = f"state saved in {saved}" if saved is not None else "the state could NOT be saved"
        hints = (f"lower generation.max_completion_len (now {c.generation.max_completion_len}) or "
                 f"data.prompts_per_step (now {c.data.prompts_per_step}) or generation.num_generations "
                 f"(now {c.generation.num_generations})")
        if phase == "train":
            if self._oom_micro is not None:
                need += f"; {self._oom_micro} sequence(s) per forward"
            if c.optim.micro_batch_size > 1:
                hints += f", lower optim.micro_batch_size (now {c.optim.micro_batch_size}; 0 = automatic)"
            if not c.model.gradient_checkpointing:
                hints += ", set model.gradient_checkpointing=true"
            if not c.model.offload_activations:
                hints += ", or model.offload_activations=true"
        else:
            hints += ", or lower generation.gpu_memory_utilization to leave room for activations"
        return TrainingOutOfMemoryError(f"out of memory during {'generation' if phase == 'generate' else 'training'} "
                                        f"at step {st.step} ({need}); {where}; {hints}")

    def train_step(self, step: int) -> dict:
        """Run step ``step`` (1-based) and return its metrics (not logged, not checkpointed)."""
        from compilepass.standby.memory import StandbyMemoryError
        from compilepass.standby.metrics import peak_memory_gib
        from compilepass.standby.rewards import RewardError

        c = self.config
        G = c.generation.num_generations
        st = _StepState(step=step, data_state=self.batcher.state_dict())
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        examples = self.batcher.next_batch()
        prompt_ids = [ids for ids in self._tokenize(examples) for _ in range(G)]
        try:
            out = self._generate(step, prompt_ids)
        except (torch.OutOfMemoryError, StandbyMemoryError) as e:
            raise self._oom("generate", st, e) from None
        mask = self._apply_stop_strings(out.completion_ids, out.completion_mask)
        ids_cpu = out.completion_ids.cpu()
        lengths = mask.sum(1).tolist()
        completions = [self.tokenizer.decode(ids_cpu[b, :n].tolist()) for b, n in enumerate(lengths)]
        prompts_text = [ex.prompt for ex in examples for _ in range(G)]
        answers = [ex.answer for ex in examples for _ in range(G)]
        meta = [ex.meta for ex in examples for _ in range(G)]
        t_gen = time.perf_counter()
        try:
            total, parts = self.rewards.score(prompts_text, completions, answers, meta)
        except RewardError as e:
            saved = self._save_after_failure(st)
            suffix = f" (state saved in {saved})" if saved is not None else " (the state could NOT be saved)"
            raise RewardError(f"step {step}: {e}{suffix}") from None
        adv, zero_std = group_advantages(total, G, c.loss.scale_rewards)
        t_rew = time.perf_counter()
        gen_peak = None
        if self.device.type == "cuda":  # generation's and training's peaks are taken apart (see _peak_gib)
            gen_peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            train_m = self._train(step, prompt_ids, out.completion_ids, mask.to(out.completion_ids.device),
                                  adv.to(self.device))
        except torch.OutOfMemoryError as e:
            raise self._oom("train", st, e) from None
        t_end = time.perf_counter()
        grouped = total.view(-1, G)
        rec = {
            "reward": float(total.mean()),
            "reward_std": float(grouped.std(1).mean()) if G > 1 else 0.0,
            **{f"rewards/{k}": float(v.mean()) for k, v in parts.items()},
            "zero_std_groups": zero_std,
            "loss": train_m.pop("loss"),
            "kl": train_m.pop("kl"),
            **{k.replace("clip_ratio/", "clip_ratio_"): v for k, v in train_m.items()},
            "completion_len": float(sum(lengths) / len(lengths)),
            "tokens_per_s": float(out.tokens_per_s),
            "gen_s": t_gen - t0,
            "reward_s": t_rew - t_gen,
            "train_s": t_end - t_rew,
            "step_s": t_end - t0,
            "peak_mem_gib": self._peak_gib(peak_memory_gib, gen_peak),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        return rec

    def _peak_gib(self, peak_memory_gib, gen_peak: Optional[int]) -> float:
        """This step's peak device memory. On CUDA: the larger of generation's allocator peak plus
        the KV region's bytes (mapped with the driver, outside the allocator) and training's
        allocator peak (of the attempt that fit, when the micro-batch was halved), plus the region
        only when standby is off (it stays mapped). On CPU: the process's peak RSS."""
        if self.device.type != "cuda":
            return peak_memory_gib()
        region = self.engine.region.nbytes if getattr(self.engine, "region", None) is not None else 0
        train_peak = torch.cuda.max_memory_allocated(self.device)
        train_region = 0 if self.config.generation.standby else region
        return max((gen_peak or 0) + region, train_peak + train_region) / 2**30

    # -- the loop ----------------------------------------------------------------------------------

    def train(self) -> GRPOSummary:
        """Run steps ``self.step + 1 .. run.max_steps``; checkpoint every ``save_every`` steps and at
        the end. Returns a :class:`GRPOSummary`."""
        from compilepass.standby.metrics import MetricsLogger, ProgressBar

        c = self.config
        t0 = time.perf_counter()
        start = self.step
        records = []
        logger = MetricsLogger(self.output_dir, tensorboard=c.run.tensorboard,
                               resume_step=start if self.resumed_from is not None else None)
        self._metrics_logger = logger
        flush = self.device.type == "cpu" and torch.set_flush_denormal(True)
        self._flush_denormal = self._flush_denormal or flush
        try:
            with ProgressBar(c.run.max_steps, start_step=start, enabled=self.progress) as bar:
                for step in range(start + 1, c.run.max_steps + 1):
                    rec = self.train_step(step)
                    self.step = step
                    if step % c.run.log_every == 0 or step == c.run.max_steps:
                        records.append(logger.log(step, rec))
                        if self.on_step is not None:
                            self.on_step(step, records[-1])
                    bar.update(step, rec)
                    if (c.run.save_every and step % c.run.save_every == 0) or step == c.run.max_steps:
                        self.save(step)
        finally:
            logger.close()
            self._metrics_logger = None
        return GRPOSummary(output_dir=str(self.output_dir), start_step=start, steps_done=self.step - start,
                           final_step=self.step, last_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                           wall_s=time.perf_counter() - t0, metrics=records)

    def close(self) -> None:
        """Free the engine's KV region and restore torch's default (off) flush-denormal mode."""
        self.engine.close()
        if self._flush_denormal:
            torch.set_flush_denormal(False)
            self._flush_denormal = False


def run_grpo(config: GRPOConfig, *, progress: bool | str = "auto", **kwargs) -> GRPOSummary:
    """Build a :class:`GRPOTrainer` for ``config``, train, release the engine, return the summary."""
    trainer = GRPOTrainer(config, progress=progress, **kwargs)
    try:
        return trainer.train()
    finally:
        trainer.close()

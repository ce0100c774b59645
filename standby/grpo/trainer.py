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
    metrics.jsonl, progress bar (or one line per logged step); checkpoint every run.save_every steps and at the end

One copy of the weights: :class:`~compilepass.standby.rollout.engine.RolloutEngine` decodes with the peft
model's own modules; its KV cache lives in a standby region that sleeps while training runs.
``generation.engine=vllm`` uses :class:`~compilepass.standby.rollout.vllm.engine.VllmEngine` instead: vLLM
in this process, the trainer's base weights views of vLLM's, the LoRA tensors pushed into vLLM's
LoRA buffers before each generation, only the KV cache released by ``sleep()``.

Reproducibility: every source of randomness is either derived from ``(run.seed, step)`` (the
sampling generator) or checkpointed (adapter, optimizer, scheduler, data position, RNG states);
dropout is 0. A run killed after its step-k checkpoint and resumed with ``run.resume=auto``
logs the same metrics for steps > k as an uninterrupted run on the same machine.

Resuming: ``run.resume=auto`` takes the newest checkpoint in ``run.output_dir`` that verifies
(:func:`~compilepass.standby.grpo.checkpoint.verify_checkpoint`: sizes and sha256 digests, meta.json,
``torch.load(weights_only=True)``, the adapter); each newer one it passes over is named in a
warning with the reason, and left where it is. A checkpoint named in ``run.resume`` must verify.

Failures (each a :class:`~compilepass.core.errors.CompilepassError`: one line from the CLI, exit 2):
a reward function raising (:class:`~compilepass.standby.grpo.rewards.RewardError`) or running out of
memory (:class:`TrainingOutOfMemoryError`) first saves the state as of the start of the failing
step (checkpoint ``step-<last completed step>``), so ``resume=auto`` retries that step. A
checkpoint that cannot be written (disk full, a file-size limit) is a
:class:`~compilepass.standby.grpo.checkpoint.CheckpointError` and leaves the previous one as it was.

Stop requests: during :meth:`GRPOTrainer.train` (main thread, ``handle_signals=True``) SIGTERM and
SIGINT are handled at safe points (:mod:`~compilepass.standby.grpo.stop`): a signal between steps
ends the run after the current step; one during a step abandons the step if its optimizer update
has not begun (after generation, after the rewards, before each training forward) and finishes
it otherwise. The state as of the last completed step is then saved (unless that checkpoint
exists already) and :class:`~compilepass.standby.grpo.stop.TrainingInterrupted` is raised with
its path; ``resume=auto`` continues from it as from any checkpoint. A second signal is delivered
to the handlers that were there before (Ctrl-C twice stops at once).

Training memory without tuning: ``optim.micro_batch_size=0`` (the default) runs the whole batch
in one forward/backward and, on a CUDA out-of-memory, halves the sequences per forward (gradients
accumulated over the micro-batches; the loss is scaled so the sum equals the whole batch's) until
it fits; the token count that fitted is kept for later steps. A fixed size is used as given.

Faults: ``GRPOTrainer(..., faults=fn)`` calls ``fn(phase, step, rows)`` before generation
(``phase="generate"``), before training (``"train"``) and before each training-side forward
(``"forward"``, with its number of sequences) and at each stage of a checkpoint save
(``"checkpoint:adapter"``, ``"checkpoint:state"``, ... the ``on_stage`` names of
:func:`~compilepass.standby.grpo.checkpoint.save_checkpoint`, with the step saved); whatever it
raises takes the path a real error would. The tests inject out-of-memory errors, signals and
file-size limits through it; by default nothing is called.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from compilepass.core.errors import ConfigError
from compilepass.core.shapes import ModelShape, causal_lm_of
from compilepass.standby.grpo.checkpoint import (CheckpointError, capture_rng_state, find_latest_valid,
                                                 list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint,
                                                 verify_checkpoint)
from compilepass.standby.grpo.config import GRPOConfig
from compilepass.standby.grpo.data import PromptBatcher, load_dataset
from compilepass.standby.grpo.distributed import DistContext, NullMetricsLogger
from compilepass.standby.grpo.group_generation import generate_share
from compilepass.standby.grpo.loss_options import loss_inputs
from compilepass.standby.grpo.metrics import MetricsLogger, ProgressBar, peak_memory_gib
from compilepass.standby.grpo.oom import TrainingOutOfMemoryError, memory_measured, out_of_memory_error
from compilepass.standby.grpo.outputs import save_final
from compilepass.standby.grpo.policy import adopt_model_arg, apply_training_memory, build_policy, load_policy_tokenizer
from compilepass.standby.grpo.prompts import CONVERSATIONAL, check_tokenizer, encode_prompt
from compilepass.standby.grpo.resume import check_resume_config
from compilepass.standby.grpo.reward_inputs import reward_inputs, reward_trainer_state
from compilepass.standby.grpo.rewards import RewardError, RewardSet
from compilepass.standby.grpo.step_metrics import completion_metrics, reward_metrics, reward_moments
from compilepass.standby.grpo.stop import STOP_SIGNALS, StopRequest, TrainingInterrupted
from compilepass.standby.grpo.trl_args import GRPOArguments
from compilepass.standby.grpo.trl_convert import trainer_config
from compilepass.standby.memory.cap import DeviceMemoryCap
from compilepass.standby.memory.errors import StandbyMemoryError
from compilepass.standby.memory.region import free_device_memory
from compilepass.standby.rollout.compile import start_compile_workers
from compilepass.standby.rollout.engine import RolloutEngine
from compilepass.standby.rollout.hf_backend import TransformersBackend, native_family_problem
from compilepass.standby.rollout.kv_plan import plan_kv_batch
from compilepass.standby.rollout.vllm.engine import VllmEngine
from compilepass.standby.rollout.vllm.gates import check_vllm
from compilepass.standby.training.entropy import EntropyMeter
from compilepass.standby.training.logprobs import policy_logprobs
from compilepass.standby.training.loss import combine_metrics, group_advantages, micro_batch_loss
from compilepass.standby.training.micro_batch import MicroBatchPlanner
from compilepass.standby.training.offload import ActivationOffload
from compilepass.standby.training.train_memory import lora_mixed_precision
from compilepass.standby.training.truncation import truncated_completions

log = logging.getLogger(__name__)

__all__ = ["GRPOTrainer", "GRPOSummary", "run_grpo", "TrainingOutOfMemoryError", "TrainingInterrupted", "step_seed"]

#: ``faults(phase, step, rows)``: see the module docstring.
FaultHook = Callable[[str, int, Optional[int]], None]

def _ids(value) -> list[int]:
    """A token id, a list of them, or None as a list."""
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of ``step`` (1-based) of a run seeded ``seed``: a resumed run reuses it."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2**62)


@dataclass
class _StepState:
    """What a failing or abandoned step needs to save the state as of its start."""
    step: int
    data_state: dict
    rng_states: dict


class _StepAbandoned(Exception):
    """A stop request reached a safe point of a step before its optimizer update."""
    def __init__(self, state: _StepState):
        super().__init__(f"step {state.step} abandoned")
        self.state = state


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
    final_adapter: Optional[str] = None  # output_dir once the last step is done (peft format; outputs.py)
    merged: Optional[str] = None  # output_dir/merged with run.save_merged

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
    on CPU). ``progress``: see :class:`~compilepass.standby.grpo.metrics.ProgressBar` (True, False,
    "auto", "lines"). ``handle_signals``: turn SIGTERM / SIGINT during ``train()`` into stop
    requests (see the module docstring).

    ``train_dataset`` (TRL's name): a ``datasets.Dataset`` / ``DatasetDict`` (``data.split``), a
    list of row dicts or a PromptDataset, used instead of ``data.dataset``; a resume checks its
    content fingerprint. ``reward_funcs`` (TRL's name): a reward or a list of them, each a
    callable, a name as in ``reward.functions`` or a ``(callable or name, weight)`` pair, used
    instead of ``reward.functions``.

    ``args`` (TRL's name): a :class:`~compilepass.standby.grpo.trl_args.GRPOArguments` (TRL's flat
    names, converted by :mod:`~compilepass.standby.grpo.trl_convert`) or a GRPOConfig, in place of
    ``config``: ``GRPOTrainer(model=..., reward_funcs=..., args=GRPOArguments(...), train_dataset=...)``.
    """

    def __init__(self, config: GRPOConfig | GRPOArguments | None = None, *, progress: bool | str = "auto",
                 on_step: Optional[Callable[[int, dict], None]] = None, compile_options: Any = "default",
                 faults: Optional[FaultHook] = None, handle_signals: bool = True, model: Any = None,
                 processing_class: Any = None, peft_config: Any = None, train_dataset: Any = None,
                 reward_funcs: Any = None, args: GRPOConfig | GRPOArguments | None = None):
        # TRL's args= (GRPOArguments, TRL's flat names) or our GRPOConfig, given once (trl_convert.py)
        config, reward_funcs = trainer_config(config, args, reward_funcs, train_dataset)
        adopt_model_arg(config, model)  # a name, path or model object given in Python (see policy.py)
        self.config = config.validate(rewards_given=reward_funcs is not None)
        c = self.config
        ProgressBar(1, enabled=progress)  # a bad value is refused here, before any work
        self.progress = progress
        self.handle_signals = handle_signals
        self.on_step = on_step
        self._faults = faults
        self._current_step = 0  # the step running (named to the fault hook)
        self._step_state: Optional[_StepState] = None  # the running step's start (for a stop request)
        self._committed = False  # the running step's optimizer update has begun: it cannot be abandoned
        self._stop: Optional[StopRequest] = None  # set while train() runs
        self._saved_step: Optional[int] = None  # the step whose state self.last_checkpoint holds
        self.output_dir = Path(c.run.output_dir)
        if c.generation.engine == "vllm":  # vLLM missing or a refused version: one line, before any work
            check_vllm(load_in_4bit=c.model.load_in_4bit)
        # torchrun's ranks (standby.grpo.distributed), else one; prompts_per_step must split evenly
        self.dist = DistContext.from_env(c.run.device, prompts_per_step=c.data.prompts_per_step)
        self.dist.check_engine(c.generation.engine)
        self.device = self.dist.device(self._resolve_device(c.run.device))
        self.memory_cap: Optional[DeviceMemoryCap] = None
        if c.run.device_memory_gib is not None:  # before anything is allocated: the run sees an N GiB card
            if self.device.type != "cuda":
                raise ConfigError(f"run.device_memory_gib caps a CUDA device; this run is on {self.device}")
            self.memory_cap = DeviceMemoryCap(c.run.device_memory_gib, self.device)
        if c.generation.engine == "native":  # Inductor's compile workers boot while the model loads
            start_compile_workers(self.device, "auto" if compile_options == "default" else compile_options)
        # Before any thread pool exists where possible: worker threads inherit the calling thread's FP mode.
        self._flush_denormal = self.device.type == "cpu" and torch.set_flush_denormal(True)
        self.tokenizer = load_policy_tokenizer(c, processing_class, model)
        self.dataset = load_dataset(train_dataset if train_dataset is not None else c.data.dataset, seed=c.data.seed,
                                    builtin_size=c.data.builtin_size, split=c.data.split)
        check_tokenizer(self.dataset.format, self.tokenizer, c.model.name_or_path)
        if self.dataset.format == CONVERSATIONAL:  # a template that cannot render these messages: now, not at step 1
            encode_prompt(self.tokenizer, self.dataset[0].prompt, c.data.chat_template_kwargs)
        self.rewards = RewardSet.from_specs(reward_funcs if reward_funcs is not None else c.reward.functions,
                                            default=self.dataset.default_rewards)
        self.rewards.check_columns(self.dataset.column_names)
        self.batcher = PromptBatcher(self.dataset, c.data.prompts_per_step, shuffle=c.data.shuffle, seed=c.data.seed)

        # Where to start: decided before building anything expensive.
        resume_from: Optional[Path] = None
        if c.run.resume == "auto":
            resume_from, skipped = find_latest_valid(self.output_dir)
            for path, reason in skipped:
                log.warning("skipping checkpoint %s: %s", path, reason)
            if resume_from is None and skipped:
                raise CheckpointError(f"run.resume is 'auto' but no checkpoint in {str(self.output_dir)!r} verifies "
                                      f"(the newest, {skipped[0][0].name}: {skipped[0][1]}); move them out of the way "
                                      f"to start over, or use another run.output_dir")
        elif c.run.resume == "never":
            if list_checkpoints(self.output_dir):
                raise ConfigError(f"run.resume is 'never' but {str(self.output_dir)!r} already holds checkpoints; "
                                  f"use run.resume=auto to continue, or another run.output_dir")
        else:
            resume_from = resolve_checkpoint(c.run.resume)
            verify_checkpoint(resume_from)  # named explicitly: a bad one is an error, never passed over
        if resume_from is not None:
            check_resume_config(resume_from, self.config.to_dict())

        torch.manual_seed(c.run.seed)
        self.model = build_policy(c, self.device, model=model, peft_config=peft_config)
        self.causal_lm = causal_lm_of(self.model)
        self._disable_dropout()
        apply_training_memory(self.causal_lm, c)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = c.optim.make_optimizer(self.params)
        self.scheduler = c.optim.make_scheduler(self.optimizer, c.run.max_steps)

        self._entropy = EntropyMeter()  # filled by the training forwards (run.log_entropy)
        self.micro_batch = MicroBatchPlanner(c.optim.micro_batch_size, on_retry=self._before_retry)
        self.step = 0
        self.resumed_from: Optional[Path] = None
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler)
            if state.data_state is not None:
                self.batcher.load_state_dict(state.data_state)
            self.step = state.step
            # the automatic micro-batch size learned before the kill: the same splits as an uninterrupted run
            self.micro_batch.fit_tokens = state.extra.get("fit_tokens")
            self.resumed_from = state.path

        self.engine = self._build_engine(compile_options)
        if c.generation.standby:
            self.engine.sleep()  # training owns the memory until the first generation
        self._metrics_logger = None
        self.last_checkpoint: Optional[Path] = self.resumed_from
        self._saved_step = self.step if self.resumed_from is not None else None

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

    def _build_engine(self, compile_options):
        c = self.config
        max_batch = c.data.prompts_per_step // self.dist.world_size * c.generation.num_generations
        max_len = c.generation.max_prompt_len + c.generation.max_completion_len
        pad = self.tokenizer.pad_token_id
        problem = native_family_problem(self.causal_lm)
        if problem is not None:  # any other family: trained all the same, generating through transformers
            log.warning("generating through transformers (slow: one eager forward per token, no CUDA graphs, no "
                        "standby KV memory): the %s engine cannot decode this model (%s)", c.generation.engine, problem)
            return TransformersBackend(self.model, max_batch=max_batch, max_len=max_len,
                                       pad_token_id=pad if pad is not None and pad < self.engine_vocab() else 0)
        if self.device.type == "cuda":
            free, total = free_device_memory(self.device)  # under a DeviceMemoryCap: the capped card
            # after the first step, the LoRA gradients and AdamW's two moments stay allocated across wakes
            reserve = 3 * sum(p.numel() * p.element_size() for p in self.params)
            max_batch = plan_kv_batch(ModelShape.from_hf_config(self.causal_lm.config), c.model.torch_dtype,
                                      max_batch, max_len, free, total, c.generation.gpu_memory_utilization,
                                      reserve=reserve)
        if compile_options == "default":
            compile_options = "auto" if self.device.type == "cuda" else False
        if c.generation.engine == "vllm":
            # vLLM loads the weights, then the trainer's base parameters become views of vLLM's tensors.
            return VllmEngine(self.model, max_batch=max_batch, max_len=max_len, compile_options=compile_options,
                              pad_token_id=pad if pad is not None and pad < self.engine_vocab() else 0,
                              seed=c.run.seed, gpu_memory_utilization=c.generation.gpu_memory_utilization)
        return RolloutEngine(self.model, max_batch=max_batch, max_len=max_len, compile_options=compile_options,
                             pad_token_id=pad if pad is not None and pad < self.engine_vocab() else 0,
                             merge_lora=c.generation.merge_lora)

    def engine_vocab(self) -> int:
        return int(self.causal_lm.config.vocab_size)

    # -- state -------------------------------------------------------------------------------------

    def save(self, step: int, data_state: Optional[dict] = None, rng_states: Optional[dict] = None) -> Path:
        """Checkpoint the adapter, optimizer, scheduler, RNG states and data position as ``step``
        (the data position and RNG states given, or the current ones). Rank 0 writes; the others
        only note the path (their state is the same)."""
        if not self.dist.is_main:
            self.last_checkpoint, self._saved_step = self.dist.checkpoint_path(self.output_dir, step), step
            return self.last_checkpoint
        tail = self._metrics_logger.tail(5) if self._metrics_logger is not None else []
        on_stage = (lambda stage: self._fault(f"checkpoint:{stage}", step)) if self._faults is not None else None
        path = save_checkpoint(self.output_dir, step, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler,
                               rng_states=rng_states if rng_states is not None else capture_rng_state(),
                               data_state=data_state if data_state is not None else self.batcher.state_dict(),
                               config_dict=self.config.to_dict(), metrics_tail=tail,
                               keep_last=self.config.run.keep_last,
                               extra={"fit_tokens": self.micro_batch.fit_tokens}, on_stage=on_stage)
        self.last_checkpoint = path
        self._saved_step = step
        return path

    def _save_step_start(self, st: _StepState, reuse: bool = False) -> Path:
        """The state as of the start of step ``st.step`` (= the end of the step before) as a
        checkpoint. ``reuse``: the existing checkpoint of that step when there is one (a failure
        saves anyway: the micro-batch size it learned goes into the checkpoint)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if (reuse and self._saved_step == st.step - 1 and self.last_checkpoint is not None
                and self.last_checkpoint.is_dir()):
            return self.last_checkpoint
        return self.save(st.step - 1, data_state=st.data_state, rng_states=st.rng_states)

    def _save_after_failure(self, st: _StepState) -> Optional[Path]:
        """Save the state as of the start of the failing step; never mask the original error."""
        try:
            return self._save_step_start(st)
        except Exception as e:  # noqa: BLE001
            log.error("could not save the state after the failure: %s", e)
            return None

    def _stop_point(self) -> None:
        """A safe point of the running step: abandon it if a stop was requested and its optimizer
        update has not begun."""
        if (self._stop is not None and self._stop.requested is not None and not self._committed
                and self._step_state is not None and not self.dist.enabled):  # ranks stop together, between steps
            raise _StepAbandoned(self._step_state)

    def _interrupted(self, signum: int, st: Optional[_StepState] = None) -> TrainingInterrupted:
        """Save the state as of the last completed step and the exception that reports it."""
        if st is None:
            path = self.last_checkpoint if self._saved_step == self.step else self.save(self.step)
            return TrainingInterrupted(signum, self.step, path)
        return TrainingInterrupted(signum, st.step - 1, self._save_step_start(st, reuse=True))

    # -- one step ----------------------------------------------------------------------------------

    def _tokenize(self, examples) -> list[list[int]]:
        c = self.config
        out = []
        for ex in examples:
            ids = encode_prompt(self.tokenizer, ex.prompt, c.data.chat_template_kwargs)
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
        self._fault("generate", step)
        eos = self.tokenizer.eos_token_id
        self.engine.wake()
        try:
            out = generate_share(self.engine, self.dist, prompt_ids, g.num_generations, step=step, run_seed=c.run.seed,
                                 step_seed=step_seed(c.run.seed, step), group_seeds=g.group_seeds,
                                 first_group=self.dist.first_group(c.data.prompts_per_step),
                                 max_new_tokens=g.max_completion_len, temperature=g.temperature, top_k=g.top_k,
                                 top_p=g.top_p, eos_token_id=eos, stop_token_ids=g.stop_token_ids or None)
        finally:
            if g.standby:
                self.engine.sleep()
        return out

    def _activation_offload(self):
        """The offload hooks for the training forward (model.offload_activations), else a no-op."""
        if not self.config.model.offload_activations:
            return contextlib.nullcontext()
        return ActivationOffload(self.model.parameters(), device=self.device)

    def _fault(self, phase: str, step: int, rows: Optional[int] = None) -> None:
        if self._faults is not None:
            self._faults(phase, step, rows)

    def _before_retry(self) -> None:
        """Before the automatic micro-batch retries a smaller size: drop the failed attempt's state."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)  # the step's peak: the attempt that fit

    def _slice_logprobs(self, sl: slice, prompt_ids, completion_ids, mask) -> torch.Tensor:
        """Per-token log-probs of rows ``sl`` (one training-side forward; gradients as enabled)."""
        self._fault("forward", self._current_step, completion_ids[sl].shape[0])
        self._stop_point()
        meter = self._entropy if torch.is_grad_enabled() and self.config.run.log_entropy else None
        return policy_logprobs(self.model, prompt_ids[sl], completion_ids[sl], mask[sl],
                               self.config.generation.temperature, self.engine.pad_token_id, entropy=meter)

    def _logprobs_in_micro_batches(self, size: int, prompt_ids, completion_ids, mask) -> torch.Tensor:
        """No-grad per-token log-probs of the whole batch, ``size`` sequences at a time."""
        return torch.cat([self._slice_logprobs(slice(lo, lo + size), prompt_ids, completion_ids, mask)
                          for lo in range(0, completion_ids.shape[0], size)])

    def _train(self, step: int, prompt_ids, completion_ids, mask, advantages, sampling=None) -> dict:
        c, lc = self.config, self.config.loss
        self._fault("train", step)
        rows = completion_ids.shape[0]
        width = max(len(p) for p in prompt_ids) + completion_ids.shape[1]
        def logprobs(size: int) -> torch.Tensor:
            return self._logprobs_in_micro_batches(size, prompt_ids, completion_ids, mask)

        ref = old = None
        if lc.beta > 0:
            with torch.no_grad(), self.model.disable_adapter():
                ref = self.micro_batch.run(rows, width, "reference log-probs", logprobs)
        if lc.num_iterations > 1:
            with torch.no_grad():
                old = self.micro_batch.run(rows, width, "old-policy log-probs", logprobs)
        n_items = self.dist.token_count(mask.sum())  # several ranks: the global token count / N
        sums: dict[str, float] = {}
        grad_norm = float("nan")
        for _ in range(lc.num_iterations):
            def accumulate(size: int) -> dict[str, torch.Tensor]:
                acc: dict[str, torch.Tensor] = {}
                self._entropy.reset()  # per attempt: a retried (smaller) micro-batch size starts over
                for lo in range(0, rows, size):
                    sl = slice(lo, lo + size)
                    # forward and backward (which recomputes checkpointed layers) under one precision setting
                    with lora_mixed_precision(self.model):
                        with self._activation_offload():
                            logp = self._slice_logprobs(sl, prompt_ids, completion_ids, mask)
                        loss, m = micro_batch_loss(logp, old, ref, advantages, mask, n_items, sl, loss_type=lc.loss_type,
                                                   beta=lc.beta, epsilon_low=lc.epsilon_low,
                                                   epsilon_high=lc.epsilon_high,
                                                   max_completion_length=c.generation.max_completion_len,
                                                   importance_sampling_level=lc.importance_sampling_level,
                                                   use_bias_correction_kl=lc.use_bias_correction_kl,
                                                   sampling=sampling, is_mode=lc.importance_sampling_mode,
                                                   is_clip_min=lc.importance_sampling_clip_min,
                                                   is_clip_max=lc.importance_sampling_clip_max)
                        loss.backward()
                    frac = mask[sl].sum() / n_items.clamp(min=1)  # token-mean metrics combine by token share
                    acc["loss"] = acc.get("loss", 0.0) + loss.detach()
                    combine_metrics(acc, m, frac)
                if c.run.log_entropy:
                    acc["entropy"] = self._entropy.mean()
                return acc

            acc = self.micro_batch.run(rows, width, "training", accumulate)
            self._committed = True
            self.dist.average_gradients(self.params)
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

    def _oom(self, phase: str, st: _StepState, err: BaseException) -> TrainingOutOfMemoryError:
        measured = memory_measured(self.device)  # before the save below empties the allocator's cache
        saved = self._save_after_failure(st)
        return out_of_memory_error(phase, st.step, err, self.config, measured, saved,
                                   self.micro_batch.failed_size if phase == "train" else None)

    def train_step(self, step: int) -> dict:
        """Run step ``step`` (1-based) and return its metrics (not logged, not checkpointed)."""
        c = self.config
        self._current_step = step
        G = c.generation.num_generations
        st = _StepState(step=step, data_state=self.batcher.state_dict(), rng_states=capture_rng_state())
        self._step_state, self._committed = st, False
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        examples = self.dist.shard(self.batcher.next_batch())  # this rank's whole prompt groups
        prompt_ids = [ids for ids in self._tokenize(examples) for _ in range(G)]
        try:
            out = self._generate(step, prompt_ids)
        except (torch.OutOfMemoryError, StandbyMemoryError) as e:
            raise self._oom("generate", st, e) from None
        self._stop_point()
        mask = self._apply_stop_strings(out.completion_ids, out.completion_mask)
        ids_cpu = out.completion_ids.cpu()
        lengths = mask.sum(1).tolist()
        completions = [self.tokenizer.decode(ids_cpu[b, :n].tolist()) for b, n in enumerate(lengths)]
        inputs = reward_inputs(examples, G, completions, [ids_cpu[b, :n].tolist() for b, n in enumerate(lengths)],
                               self.dataset.format, self.dataset.column_names)
        state = reward_trainer_state(step, c.run.max_steps,
                                     self.batcher.epoch + self.batcher.position / len(self.dataset))
        t_gen = time.perf_counter()
        try:
            total, parts = self.rewards.score(**inputs, trainer_state=state)
        except RewardError as e:
            saved = self._save_after_failure(st)
            suffix = f" (state saved in {saved})" if saved is not None else " (the state could NOT be saved)"
            raise RewardError(f"step {step}: {e}{suffix}") from None
        adv, _ = group_advantages(total, G, c.loss.scale_rewards)
        # cut at the length limit rather than ended (EOS, a stop token or a stop string): one
        # answer for the loss's mask_truncated_completions and the completions/* metrics
        truncated = truncated_completions(out.completion_ids, mask,
                                          [*_ids(self.tokenizer.eos_token_id), *c.generation.stop_token_ids],
                                          completions, c.generation.stop)
        loss_mask, sampling = loss_inputs(c.loss, out, mask, truncated)
        self._stop_point()
        t_rew = time.perf_counter()
        gen_peak = None
        if self.device.type == "cuda":  # generation's and training's peaks are taken apart (see _peak_gib)
            gen_peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            train_m = self._train(step, prompt_ids, out.completion_ids, loss_mask.to(out.completion_ids.device),
                                  adv.to(self.device), sampling=sampling)
        except torch.OutOfMemoryError as e:
            raise self._oom("train", st, e) from None
        t_end = time.perf_counter()
        labelled = {self.rewards.labels[k]: v for k, v in parts.items()}
        rec = {  # TRL's names (step_metrics.py), then ours
            **reward_metrics(total, labelled, G),
            **self.rewards.logged_metrics,
            "loss": train_m.pop("loss"),
            "kl": train_m.pop("kl"),
            **train_m,
            **completion_metrics(lengths, truncated.tolist()),
            "learning_rate": float(self.optimizer.param_groups[0]["lr"]),
            "tokens_per_s": float(out.tokens_per_s),
            "gen_s": t_gen - t0,
            "reward_s": t_rew - t_gen,
            "train_s": t_end - t_rew,
            "step_s": t_end - t0,
            "peak_mem_gib": self._peak_gib(gen_peak),
        }
        moments = reward_moments(total, labelled) if self.dist.enabled else None  # pooled over ranks
        return self.dist.reduce_metrics(rec, moments=moments)

    def _peak_gib(self, gen_peak: Optional[int]) -> float:
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
        the end. Returns a :class:`GRPOSummary`; raises :class:`TrainingInterrupted` after a stop
        request (see the module docstring)."""
        c = self.config
        t0 = time.perf_counter()
        start = self.step
        records = []
        logger = (MetricsLogger if self.dist.is_main else NullMetricsLogger)(  # rank 0 writes metrics.jsonl
            self.output_dir, tensorboard=c.run.tensorboard, report_to=c.run.report_to,
            resume_step=start if self.resumed_from is not None else None, run_config=c.to_dict())
        self._metrics_logger = logger
        flush = self.device.type == "cpu" and torch.set_flush_denormal(True)
        self._flush_denormal = self._flush_denormal or flush
        try:
            with StopRequest(STOP_SIGNALS if self.handle_signals else ()) as stop, \
                    ProgressBar(c.run.max_steps, start_step=start,
                                enabled=self.progress if self.dist.is_main else False) as bar:
                self._stop = stop
                if self.resumed_from is not None:
                    self._announce(bar, f"resumed from {self.resumed_from} (step {start})")
                for step in range(start + 1, c.run.max_steps + 1):
                    try:
                        rec = self.train_step(step)
                    except _StepAbandoned as a:
                        raise self._interrupted(stop.requested, a.state) from None
                    self.step = step
                    logged = step % c.run.log_every == 0 or step == c.run.max_steps
                    if logged:
                        records.append(logger.log(step, rec))
                        if self.on_step is not None:
                            self.on_step(step, records[-1])
                    bar.update(step, rec, logged=logged)
                    if (c.run.save_every and step % c.run.save_every == 0) or step == c.run.max_steps:
                        self.dist.barrier()
                        self.save(step)
                    if self.dist.any(stop.requested is not None) and step < c.run.max_steps:
                        raise self._interrupted(stop.requested or STOP_SIGNALS[0])  # another rank's
        finally:
            self._stop = None
            self._step_state = None
            logger.close()
            self._metrics_logger = None
        final = self.save_final() if self.step == c.run.max_steps else {}
        return GRPOSummary(output_dir=str(self.output_dir), start_step=start, steps_done=self.step - start,
                           final_step=self.step, last_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                           wall_s=time.perf_counter() - t0, metrics=records, final_adapter=final.get("adapter"),
                           merged=final.get("merged"))

    def save_final(self, merged: Optional[bool] = None) -> dict:
        """The final adapter (peft format) and tokenizer into ``run.output_dir``, and the merged
        model into ``output_dir/merged`` when ``merged`` (default ``run.save_merged``); see
        :mod:`~compilepass.standby.grpo.outputs`. :meth:`train` calls it after the last step; on
        several ranks only rank 0 writes (the adapters are identical)."""
        c = self.config
        if not self.dist.is_main:
            return {}
        return save_final(self.model, self.tokenizer, self.output_dir, base_name=c.model.name_or_path,
                          merged=c.run.save_merged if merged is None else merged)

    @staticmethod
    def _announce(bar: ProgressBar, text: str) -> None:
        """One line where the run's progress goes (the log at INFO when it shows nothing)."""
        if bar.mode == "off":
            log.info("%s", text)
        else:
            bar.note(f"grpo: {text}")

    def close(self) -> None:
        """Free the engine's KV region and the memory cap's hold, and restore torch's default (off)
        flush-denormal mode."""
        self.engine.close()
        self.rewards.close()
        self.dist.close()
        if self.memory_cap is not None:
            self.memory_cap.close()
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

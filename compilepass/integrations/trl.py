"""TRL's own ``GRPOTrainer``, generating with compilepass's rollout engine and standby KV memory.

A TRL script changes one import::

    from trl import GRPOConfig
    from compilepass.integrations.trl import GRPOTrainer      # was: from trl import GRPOTrainer

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                          peft_config=LoraConfig(...))
    trainer.train()

Everything else is TRL's: data, chat templates, rewards, advantages, losses, logging, checkpoints.
What changes is generation: TRL's ``rollout_func`` hook runs
:class:`~compilepass.standby.rollout.engine.RolloutEngine` over the policy being trained (LoRA
applied live, no weight sync, one copy of the weights; CUDA graphs and the tuning database's flags
where there is a GPU), and the engine's KV region sleeps while TRL trains (its memory given back)
and wakes at the same addresses before the next generation. Prompts are tokenized by TRL's own
``_tokenize_prompts`` (its chat template and ``chat_template_kwargs``); completions stop at TRL's
EOS ids; the sampling log-probs returned are the engine's, so TRL's
``vllm_importance_sampling_correction`` applies to them unchanged.

The training-side log-probs (and the ``entropy`` TRL logs and masks with) come from compilepass's
kernels too: TRL's ``_get_per_token_logps_and_entropies`` is replaced by the model body followed by
:func:`compilepass.kernels.selective_log_softmax` over the completion positions (Triton on CUDA:
no ``[tokens x vocab]`` logits, the entropy from the same pass). TRL's own fused head runs instead,
with the reason logged once, where ours does not apply: ``kernel_logprobs=False``, an output head
that is not a bias-free projection of the last hidden state (soft-capping, logit scaling),
multimodal inputs, MoE auxiliary losses, an entropy bonus (``entropy_coef`` /
``use_adaptive_entropy``: its gradient flows through the entropy), or several processes (the
body is called inside the DDP / FSDP wrapper only through TRL's path).

Supported TRL versions: :data:`SUPPORTED_TRL` (checked at import, one clear error otherwise). Not
supported (refused at construction with the reason): ``use_vllm`` (this replaces it), tools /
environments, vision-language models, ``min_p`` and ``repetition_penalty`` other than 1.
Engine options (``max_batch``, ``compile_options``, ...) go in ``rollout_engine_options``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from compilepass.core.errors import CompilepassError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["GRPOTrainer", "SUPPORTED_TRL", "check_trl", "TrlVersionError"]

SUPPORTED_TRL = ">=1.16,<1.17"


class TrlVersionError(CompilepassError):
    """TRL is missing or its version is outside :data:`SUPPORTED_TRL`."""


def check_trl():
    """The imported ``trl`` module, or :class:`TrlVersionError` with what to install."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    try:
        import trl
    except ImportError as exc:
        raise TrlVersionError(f"compilepass.integrations.trl needs TRL {SUPPORTED_TRL}, which does not import "
                              f"here ({exc}); pip install 'compilepass[trl]'") from None
    version = str(getattr(trl, "__version__", "0"))
    if Version(version.split("+")[0]) not in SpecifierSet(SUPPORTED_TRL):
        raise TrlVersionError(f"compilepass.integrations.trl supports TRL {SUPPORTED_TRL}; TRL {version} is "
                              f"installed (its generation hooks differ); pip install 'trl{SUPPORTED_TRL}'")
    return trl


_trl = check_trl()


class GRPOTrainer(_trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose generation runs on compilepass's rollout engine (module doc).

    Extra keywords: ``rollout_engine_options`` (dict) for
    :class:`~compilepass.standby.rollout.engine.RolloutEngine` (e.g. ``compile_options=False`` for
    eager, ``max_batch``). ``self.rollout_engine`` is the engine once the first batch is generated.
    ``compile_train``: compile the training forward in place with the tuning database's flags for
    workload ``train`` (never a rollout entry; one log line names the entry and why): ``False``
    (default) never, ``"auto"`` on CUDA only, ``True`` always. Off by default: a cold compile of a
    training forward took 60-140 s on an H100 (the shipped train entries), and on the H200 the
    first steps of a 4-step run with it did not finish within 110 s, against a 1.22x faster step
    at best (qwen3-0.6b's train entry): worth it for long runs only. ``self.train_compile_selection`` is
    that :class:`~compilepass.selection.Selection` (None when not compiled).
    ``kernel_logprobs`` (default True): training-side log-probs and entropies through compilepass's
    kernels where they apply (module doc); False keeps TRL's fused head. ``self.logprobs_path`` says
    which ran last (``"compilepass"`` or ``"trl: <why>"``).
    """

    def __init__(self, *args, rollout_engine_options: Optional[dict] = None, compile_train=False,
                 kernel_logprobs: bool = True, **kwargs):
        if compile_train not in ("auto", True, False):
            raise ConfigError(f"compile_train must be 'auto', True or False (got {compile_train!r})")
        if kernel_logprobs not in (True, False):
            raise ConfigError(f"kernel_logprobs must be True or False (got {kernel_logprobs!r})")
        self.kernel_logprobs = kernel_logprobs
        self.logprobs_path: Optional[str] = None
        if kwargs.get("rollout_func") is not None:
            raise ConfigError("compilepass's GRPOTrainer supplies rollout_func itself; pass none")
        for name in ("tools", "environment_factory"):
            if kwargs.get(name):
                raise ConfigError(f"compilepass's GRPOTrainer does not support {name} (generation is one turn)")
        kwargs["rollout_func"] = _rollout
        self.rollout_engine = None
        self.rollout_engine_options = dict(rollout_engine_options or {})
        self.rollout_calls = 0
        import torch

        if torch.cuda.is_available():  # Inductor's compile workers boot while TRL loads the model
            from compilepass.standby.rollout.compile import start_compile_workers

            start_compile_workers("cuda", self.rollout_engine_options.get("compile_options", "auto"),
                                  self.rollout_engine_options.get("compile_backend", "inductor"))
        super().__init__(*args, **kwargs)
        args_ = self.args
        if getattr(args_, "use_vllm", False):
            raise ConfigError("use_vllm and compilepass's GRPOTrainer both generate: turn use_vllm off")
        if getattr(self, "_is_vlm", False):
            raise ConfigError("compilepass's GRPOTrainer generates for text-only causal LMs (this is a VLM)")
        if getattr(args_, "min_p", None):
            raise ConfigError("min_p sampling is not supported by compilepass's rollout engine")
        if float(getattr(args_, "repetition_penalty", 1.0) or 1.0) != 1.0:
            raise ConfigError("repetition_penalty != 1 is not supported by compilepass's rollout engine")
        self.train_compile_selection = self._compile_training_forward(compile_train)

    def _compile_training_forward(self, compile_train):
        """Compile ``self.model`` (what TRL calls for log-probs) in place with train-workload flags."""
        from compilepass.selection import compile_module_in_place

        on_cuda = next(self.model.parameters()).is_cuda
        if compile_train is False or (compile_train == "auto" and not on_cuda):
            return None
        from compilepass.core.shapes import causal_lm_of

        policy = self.accelerator.unwrap_model(self.model)
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        # The body (the decoder stack, LoRA layers included) is what both log-prob paths call: ours
        # directly, TRL's fused head through the model's forward; the head itself is a kernel (ours)
        # or TRL's tiled loop, neither of which Dynamo would trace into one graph.
        body = causal_lm_of(policy).base_model
        # the prompt lengths are not known before the data is seen: the train entry's bucket is chosen
        # without a sequence length (the lookup's nearest-bucket rules apply)
        return compile_module_in_place(body, model=base, workload="train")

    # -- training-side log-probs ---------------------------------------------------------------

    def _kernel_logprobs_head(self, model, compute_aux_loss: bool, extra: dict):
        """``(causal_lm, lm_head)`` when compilepass's kernels compute these log-probs, else the reason."""
        from compilepass.core.shapes import causal_lm_of
        from compilepass.standby.training.logprobs import hidden_state_head

        if not self.kernel_logprobs:
            return "kernel_logprobs=False"
        if self.accelerator.num_processes > 1:
            return "several processes (the DDP / FSDP wrapper runs only through TRL's forward)"
        if compute_aux_loss:
            return "an MoE auxiliary loss is requested"
        if any(v is not None for v in extra.values()):
            return "multimodal inputs"
        if getattr(self, "_entropy_bonus_enabled", False):
            return "an entropy bonus (its gradient flows through the entropy)"
        causal_lm = causal_lm_of(self.accelerator.unwrap_model(model))
        head = hidden_state_head(causal_lm)
        if head is None:
            return f"the {getattr(causal_lm.config, 'model_type', '?')} output head is not a bias-free projection"
        return causal_lm, head

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        """TRL's method, computed by the model body and compilepass's log-prob kernel (module doc);
        TRL's own where that does not apply. Same inputs and outputs as TRL's: ``[B, logits_to_keep]``
        log-probs and entropies, 0 at padding."""
        import torch

        from compilepass.kernels import selective_log_softmax

        found = self._kernel_logprobs_head(model, compute_aux_loss, extra)
        if isinstance(found, str):
            self._note_logprobs_path("trl: " + found)
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        self._note_logprobs_path("compilepass")
        causal_lm, head = found
        fp32_head = bool(getattr(self.args, "cast_lm_head_to_fp32", False))
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for lo in range(0, input_ids.size(0), batch_size):
            ids, am = input_ids[lo:lo + batch_size], attention_mask[lo:lo + batch_size]
            with self.accelerator.autocast():
                hidden = causal_lm.base_model(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
                hidden = hidden[:, -logits_to_keep - 1:-1]  # the output at position i predicts token i + 1
                keep = am[:, -logits_to_keep:].bool()
                if fp32_head:  # TRL's cast_lm_head_to_fp32: the head in float32, outside autocast
                    with torch.autocast(hidden.device.type, enabled=False):
                        out = selective_log_softmax(hidden[keep].float(), head.weight, ids[:, -logits_to_keep:][keep],
                                                    self.temperature, return_entropy=compute_entropy)
                else:
                    out = selective_log_softmax(hidden[keep], head.weight, ids[:, -logits_to_keep:][keep],
                                                self.temperature, return_entropy=compute_entropy)
            lp, ent = out if compute_entropy else (out, None)
            # masked_scatter keeps an all-padding micro-batch connected to the graph (a zero loss)
            logps.append(lp.new_zeros(keep.shape).masked_scatter(keep, lp))
            if compute_entropy:
                entropies.append(ent.new_zeros(keep.shape).masked_scatter(keep, ent))
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    def _note_logprobs_path(self, path: str) -> None:
        if path != self.logprobs_path:
            log.info("training log-probs: %s", path)
        self.logprobs_path = path

    # -- the engine --------------------------------------------------------------------------

    def _policy(self):
        return self.accelerator.unwrap_model(self.model)

    def _engine_for(self, n_prompts: int, longest_prompt: int):
        from compilepass.standby.rollout.engine import RolloutEngine

        need_len = longest_prompt + int(self.max_completion_length)
        engine = self.rollout_engine
        if engine is not None and engine.max_len >= need_len:
            return engine
        if engine is not None:
            log.info("prompts grew to %d tokens: rebuilding the rollout engine", longest_prompt)
            engine.close()
        options = dict(self.rollout_engine_options)
        max_batch = int(options.pop("max_batch", n_prompts))
        # room for longer prompts later without a rebuild
        max_len = int(options.pop("max_len", max(need_len, 2 * longest_prompt + int(self.max_completion_length))))
        options.setdefault("pad_token_id", self._tokenizer.pad_token_id)
        self.rollout_engine = RolloutEngine(self._policy(), max_batch=max_batch, max_len=max_len, **options)
        return self.rollout_engine

    def generate_with_engine(self, prompts: list) -> dict:
        """The ``rollout_func`` body: tokenize as TRL does, generate (wake -> generate -> sleep),
        return TRL's ``prompt_ids`` / ``completion_ids`` / ``logprobs`` lists."""
        import torch

        prompt_ids, images, _ = self._tokenize_prompts(prompts)
        if images is not None and any(images):
            raise ConfigError("compilepass's GRPOTrainer generates text only; these prompts hold images")
        engine = self._engine_for(len(prompt_ids), max(len(p) for p in prompt_ids))
        top_k = int(self.top_k or 0)
        top_p = float(self.top_p if self.top_p is not None else 1.0)
        completion_ids: list[list[int]] = []
        logprobs: list[list[float]] = []
        was_training = self.model.training
        self.model.eval()
        engine.wake()
        try:
            with torch.no_grad():
                for lo in range(0, len(prompt_ids), engine.max_batch):
                    chunk = prompt_ids[lo:lo + engine.max_batch]
                    out = engine.generate(chunk, max_new_tokens=int(self.max_completion_length),
                                          temperature=float(self.temperature), top_k=top_k, top_p=top_p,
                                          eos_token_id=list(self.eos_token_ids))
                    lp = getattr(out, "sampling_logprobs", None)
                    lp = out.logprobs if lp is None else lp
                    lengths = out.completion_lengths.tolist()
                    ids = out.completion_ids.tolist()
                    lps = lp.float().tolist()
                    for b, n in enumerate(lengths):
                        completion_ids.append(ids[b][:n])
                        logprobs.append(lps[b][:n])
        finally:
            engine.sleep()  # standby: the KV region's memory is free while TRL trains
            self.model.train(was_training)
        self.rollout_calls += 1
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def _rollout(prompts: list, trainer: Any) -> dict:
    return trainer.generate_with_engine(prompts)

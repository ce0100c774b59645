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
    workload ``train`` (never a rollout entry; one log line names the entry and why): ``"auto"``
    (default) on CUDA only, ``True`` always, ``False`` never. ``self.train_compile_selection`` is
    that :class:`~compilepass.selection.Selection` (None when not compiled).
    """

    def __init__(self, *args, rollout_engine_options: Optional[dict] = None, compile_train="auto", **kwargs):
        if compile_train not in ("auto", True, False):
            raise ConfigError(f"compile_train must be 'auto', True or False (got {compile_train!r})")
        if kwargs.get("rollout_func") is not None:
            raise ConfigError("compilepass's GRPOTrainer supplies rollout_func itself; pass none")
        for name in ("tools", "environment_factory"):
            if kwargs.get(name):
                raise ConfigError(f"compilepass's GRPOTrainer does not support {name} (generation is one turn)")
        kwargs["rollout_func"] = _rollout
        self.rollout_engine = None
        self.rollout_engine_options = dict(rollout_engine_options or {})
        self.rollout_calls = 0
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
        policy = self.accelerator.unwrap_model(self.model)
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        # the prompt lengths are not known before the data is seen: the train entry's bucket is chosen
        # without a sequence length (the lookup's nearest-bucket rules apply)
        return compile_module_in_place(self.model, model=base, workload="train")

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

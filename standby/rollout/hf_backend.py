"""Generation through transformers, for model families the native engine does not decode.

:class:`TransformersBackend` is a :class:`~compilepass.standby.rollout.backend.RolloutBackend`
over any transformers causal LM (optionally peft-wrapped), with the trainer's own modules: the
model's forward with the KV cache the model itself creates (``use_cache=True``; whatever cache
class its family needs), left-padded prompts, and our sampler
(:func:`~compilepass.standby.rollout.sampling.sample_tokens`), so temperature / top-k / top-p,
the seed and the reported log-probs (``log_softmax(logits / temperature)`` at the drawn token)
mean what they mean for the native engine. No compile, no CUDA graph, no standby region: the
cache is allocated per call and freed after it; ``sleep`` / ``wake`` only flip the state. It is
slow (one eager forward per token), which the GRPO trainer says once in its log.

:func:`native_family_problem` says why the native engines cannot decode a model (None when they can).
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence, Union

import torch

from compilepass.core.errors import ModelNotFoundError
from compilepass.core.shapes import FAMILIES, ModelShape, causal_lm_of
from compilepass.standby.rollout.backend import RolloutOutput, check_generate_args
from compilepass.standby.rollout.modes import eval_mode
from compilepass.standby.rollout.sampling import sample_tokens

log = logging.getLogger(__name__)

__all__ = ["TransformersBackend", "native_family_problem"]


def native_family_problem(model) -> Optional[str]:
    """Why the native (and vLLM) engines cannot decode ``model``, or None when they can: its
    ``model_type`` must be one of :data:`~compilepass.core.shapes.FAMILIES` with a readable shape."""
    config = getattr(causal_lm_of(model), "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        return f"model type {family!r} is not one of the engine's families ({', '.join(FAMILIES)})"
    try:
        ModelShape.from_hf_config(config)
    except (ModelNotFoundError, AttributeError, TypeError) as e:
        return f"its config has no shape the engine reads ({e})"
    return None


class TransformersBackend:
    """Generate with ``model`` (a transformers causal LM or a peft model over one) through its own
    forward, ``max_batch`` sequences at a time, at most ``max_len`` tokens each.

    ``shape`` is None (the family need not be one the engine knows); ``region`` is None (no
    standby KV region: peak memory is whatever the cache takes during a call)."""

    def __init__(self, model, max_batch: int, max_len: int, *, pad_token_id: Optional[int] = None,
                 device: Union[None, str, torch.device] = None):
        t0 = time.perf_counter()
        self.model = model
        self.causal_lm = causal_lm_of(model)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_batch, self.max_len = int(max_batch), int(max_len)
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.max_len < 2:
            raise ValueError("max_len must be >= 2")
        config = self.causal_lm.config
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.vocab_size = int(self.causal_lm.get_output_embeddings().weight.shape[0])
        self.shape: Optional[ModelShape] = None
        self.region = None
        self._awake = True
        self.cold_start_s = time.perf_counter() - t0

    @property
    def is_awake(self) -> bool:
        return self._awake

    def sleep(self) -> None:
        self._awake = False

    def wake(self) -> None:
        self._awake = True

    def close(self) -> None:
        self._awake = False

    def __repr__(self) -> str:
        return (f"TransformersBackend({getattr(self.causal_lm.config, 'model_type', '?')}, "
                f"max_batch={self.max_batch}, max_len={self.max_len})")

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, eos_token_id: Union[None, int, Sequence[int]] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, seed: Optional[int] = None) -> RolloutOutput:
        """Complete each prompt (see :class:`~compilepass.standby.rollout.backend.RolloutBackend`)."""
        if not self._awake:
            raise RuntimeError("the rollout backend is asleep: call wake() first")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        prompts, stops = check_generate_args(prompts, max_new_tokens, top_k, top_p, self.max_len, self.vocab_size,
                                             eos_token_id, stop_token_ids)
        t0 = time.perf_counter()
        generator = None
        if seed is not None and temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        stop_t = torch.tensor(stops, dtype=torch.long, device=self.device)
        parts, steps, prefill_s = [], 0, 0.0
        with eval_mode(self.model):
            for lo in range(0, len(prompts), self.max_batch):
                chunk = prompts[lo:lo + self.max_batch]
                ids, mask, lps, n, pre = self._generate_chunk(chunk, max_new_tokens, temperature, top_k, top_p,
                                                              stop_t, generator)
                parts.append((ids, mask, lps))
                steps += n
                prefill_s += pre
        width = max(p[0].shape[1] for p in parts)

        def cat(i: int, fill) -> torch.Tensor:
            return torch.cat([torch.nn.functional.pad(p[i], (0, width - p[i].shape[1]), value=fill) for p in parts])

        ids, mask, lps = cat(0, self.pad_token_id), cat(1, 0), cat(2, 0.0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        total = time.perf_counter() - t0
        lengths = mask.sum(1)
        return RolloutOutput(
            completion_ids=ids, completion_mask=mask, logprobs=lps,
            prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device),
            completion_lengths=lengths, prefill_s=prefill_s, decode_s=total - prefill_s, total_s=total,
            decode_steps=steps, tokens_per_s=float(lengths.sum()) / total if total > 0 else 0.0,
            extra={"backend": "transformers"})

    def _generate_chunk(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
                        top_p: float, stops: torch.Tensor, generator: Optional[torch.Generator]):
        """One batch: left-padded prefill, then one forward per token over the model's own cache."""
        dev, B = self.device, len(prompts)
        P = max(len(p) for p in prompts)
        input_ids = torch.full((B, P), self.pad_token_id, dtype=torch.long, device=dev)
        attn = torch.zeros((B, P), dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            input_ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=dev)
            attn[b, P - len(p):] = 1
        positions = (attn.cumsum(1) - 1).clamp_min(0)
        ids = torch.full((B, max_new_tokens), self.pad_token_id, dtype=torch.long, device=dev)
        mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=dev)
        lps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        t0 = time.perf_counter()
        out = self.causal_lm(input_ids=input_ids, attention_mask=attn, position_ids=positions, use_cache=True)
        prefill_s = time.perf_counter() - t0
        key = "cache" if "cache" in out.keys() else "past_key_values"  # transformers >= 5.2x renamed it "cache"
        cache, logits = out[key], out.logits[:, -1]
        next_pos = positions[:, -1] + 1
        n = 0
        for t in range(max_new_tokens):
            tokens, logp = sample_tokens(logits.float(), temperature, top_k, top_p, generator=generator)
            live = ~finished
            ids[:, t] = torch.where(live, tokens, torch.full_like(tokens, self.pad_token_id))
            mask[:, t] = live.long()
            lps[:, t] = torch.where(live, logp, torch.zeros_like(logp))
            if stops.numel():
                finished = finished | (live & torch.isin(tokens, stops))
            n = t + 1
            if t + 1 == max_new_tokens or bool(finished.all()):
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], 1)
            out = self.causal_lm(input_ids=ids[:, t:t + 1], attention_mask=attn, position_ids=next_pos[:, None],
                                 use_cache=True, **{key: cache})
            cache, logits = out[key], out.logits[:, -1]
            next_pos = next_pos + 1
        return ids[:, :n], mask[:, :n], lps[:, :n], n, prefill_s

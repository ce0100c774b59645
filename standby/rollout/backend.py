"""What every rollout engine shares: the request (:class:`SamplingParams`), its checks
(:func:`check_generate_args`), the result (:class:`RolloutOutput`) and the interface
(:class:`RolloutBackend`) that the native engine
(:class:`~compilepass.standby.rollout.engine.RolloutEngine`), the vLLM engine
(:class:`~compilepass.standby.rollout.vllm.engine.VllmEngine`) and generation through transformers
for other model families (:class:`~compilepass.standby.rollout.hf_backend.TransformersBackend`)
provide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from compilepass.core.shapes import ModelShape

__all__ = ["RolloutBackend", "RolloutOutput", "SamplingParams", "check_generate_args"]


@dataclass
class RolloutOutput:
    """What an engine's ``generate`` returns; tensors on the engine's device.

    ``completion_ids`` [B, N]: N is the longest completion of the call; positions after a
    sequence's stop hold ``pad_token_id``. ``completion_mask`` [B, N] (long): 1 up to and
    including the stop token (EOS / stop token), 0 after. ``logprobs`` [B, N] float32: at each
    sampled token, ``log_softmax(logits / temperature)`` of the model's raw logits (temperature
    1 when greedy), with top-k / top-p NOT applied — the policy's log-prob at the sampling
    temperature, which is what TRL's GRPO compares against; 0 where the mask is 0.
    ``prompt_lengths`` / ``completion_lengths`` [B] (long). ``sampling_logprobs`` [B, N] float32:
    at each sampled token, its log-prob under the distribution it was drawn from (temperature,
    then top-k / top-p, renormalized; vLLM's ``processed_logprobs``), which TRL's
    importance-sampling correction compares against; the same as ``logprobs`` without top-k /
    top-p; 0 where the mask is 0; None from an engine that cannot say.

    Timing (seconds, wall clock, the device synchronized): ``prefill_s``, ``decode_s`` (every
    decode step and the sampling between them), ``total_s``; ``decode_steps`` (graph replays);
    ``tokens_per_s`` = sum(completion_lengths) / total_s. With ``merge_lora`` (native engine) ``total_s``
    also holds the merge of the adapters and the restore of the base weights.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_lengths: torch.Tensor
    completion_lengths: torch.Tensor
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    decode_steps: int = 0
    tokens_per_s: float = 0.0
    extra: dict = field(default_factory=dict)
    sampling_logprobs: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class SamplingParams:
    """How to complete a batch of prompts: the keyword arguments of an engine's ``generate``.

    Named as vLLM's ``SamplingParams`` where it has the field: ``temperature``, ``top_k``,
    ``top_p``, ``stop_token_ids`` and ``seed`` are vLLM's; ``max_new_tokens`` is vLLM's
    ``max_tokens``; ``eos_token_id`` has no vLLM field (the vLLM engine passes it on as a stop
    token, with ``ignore_eos``). ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1``
    are off. A sequence stops after the first token in ``eos_token_id`` or ``stop_token_ids`` (an
    id or a sequence of ids; kept in the completion) or at ``max_new_tokens``.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: Union[None, int, Sequence[int]] = None
    stop_token_ids: Optional[Sequence[int]] = None
    seed: Optional[int] = None

    def validate(self, max_len: int) -> list[int]:
        """Check the sampling fields for an engine of ``max_len`` tokens per sequence (ValueError
        with the reason); return the sorted, de-duplicated stop ids (EOS and stop tokens). The
        prompts themselves are checked by :func:`check_generate_args`."""
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.max_new_tokens > max_len:  # every prompt holds at least one token
            raise ValueError(f"max_new_tokens {self.max_new_tokens} exceeds the engine's max_len {max_len}")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        stops: list[int] = []
        for ids in (self.eos_token_id, self.stop_token_ids):
            if ids is None:
                continue
            stops.extend([int(ids)] if isinstance(ids, int) else [int(t) for t in ids])
        return sorted(set(stops))


def check_generate_args(prompts, max_new_tokens: int, top_k: int, top_p: float, max_len: int, vocab_size: int,
                        eos_token_id=None, stop_token_ids=None) -> tuple[list[list[int]], list[int]]:
    """The checks every engine's ``generate`` makes (ValueError with the reason): returns the
    prompts as lists of ints and the sorted, de-duplicated stop ids (EOS and stop tokens).
    The temperature is not checked here (see :meth:`SamplingParams.validate`)."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("no prompts")
    stops = SamplingParams(max_new_tokens, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                           stop_token_ids=stop_token_ids).validate(max_len)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new_tokens - 1 > max_len:
            raise ValueError(f"prompt {i} ({len(p)} tokens) + max_new_tokens {max_new_tokens} exceeds the "
                             f"engine's max_len {max_len}")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} holds a token id outside [0, {vocab_size})")
    return prompts, stops


@runtime_checkable
class RolloutBackend(Protocol):
    """What a rollout engine provides (``RolloutEngine``, ``VllmEngine``, ``TransformersBackend``).

    ``generate`` completes each prompt (a list of token ids) as :class:`SamplingParams` describes
    and returns a :class:`RolloutOutput`; ``sleep`` releases the KV cache's memory and ``wake``
    maps it again (both idempotent; no ``generate`` while asleep); ``close`` frees the engine.
    ``shape`` is None for ``TransformersBackend`` (its families have no :class:`ModelShape`).
    """

    pad_token_id: int
    shape: Optional[ModelShape]
    cold_start_s: float

    @property
    def is_awake(self) -> bool: ...

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, eos_token_id: Union[None, int, Sequence[int]] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, seed: Optional[int] = None) -> RolloutOutput: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...

"""Generating a step's completions on one rank: its whole share in one engine call (the default),
or each prompt group in its own call (``generation.group_seeds``), seeded by the group's global
index so that the samples do not depend on how the batch is split over ranks."""

from __future__ import annotations

from typing import Sequence

import torch

from compilepass.standby.grpo.distributed import DistContext, group_seed, rank_seed
from compilepass.standby.rollout.backend import RolloutOutput

__all__ = ["generate_share", "concat_outputs"]


def generate_share(engine, dist: DistContext, prompt_ids: Sequence[Sequence[int]], group_size: int, *,
                   step: int, run_seed: int, step_seed: int, group_seeds: bool, first_group: int,
                   **generate_kwargs) -> RolloutOutput:
    """``engine.generate`` over this rank's ``prompt_ids`` (G = ``group_size`` rows per prompt, laid
    out group by group). ``group_seeds`` false: one call seeded ``rank_seed(step_seed, rank)``.
    True: one call per group, group ``first_group + i`` seeded ``group_seed(run_seed, step, ...)``."""
    if not group_seeds:
        return engine.generate(prompt_ids, seed=rank_seed(step_seed, dist.rank), **generate_kwargs)
    parts = []
    for i in range(0, len(prompt_ids), group_size):
        seed = group_seed(run_seed, step, first_group + i // group_size)
        parts.append(engine.generate(prompt_ids[i:i + group_size], seed=seed, **generate_kwargs))
    return concat_outputs(parts, engine.pad_token_id)


def _pad_to(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def concat_outputs(parts: Sequence[RolloutOutput], pad_token_id: int) -> RolloutOutput:
    """One :class:`RolloutOutput` of the rows of ``parts`` in order, the completions right-padded
    (ids with ``pad_token_id``, masks and log-probs with 0) to the longest; times and steps summed."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.completion_ids.shape[1] for p in parts)
    slps = None
    if all(p.sampling_logprobs is not None for p in parts):
        slps = torch.cat([_pad_to(p.sampling_logprobs, width, 0.0) for p in parts])
    total = sum(p.total_s for p in parts)
    lengths = torch.cat([p.completion_lengths for p in parts])
    return RolloutOutput(
        completion_ids=torch.cat([_pad_to(p.completion_ids, width, pad_token_id) for p in parts]),
        completion_mask=torch.cat([_pad_to(p.completion_mask, width, 0) for p in parts]),
        logprobs=torch.cat([_pad_to(p.logprobs, width, 0.0) for p in parts]),
        prompt_lengths=torch.cat([p.prompt_lengths for p in parts]),
        completion_lengths=lengths,
        prefill_s=sum(p.prefill_s for p in parts), decode_s=sum(p.decode_s for p in parts), total_s=total,
        decode_steps=sum(p.decode_steps for p in parts),
        tokens_per_s=float(lengths.sum()) / total if total > 0 else float("nan"),
        sampling_logprobs=slps,
    )

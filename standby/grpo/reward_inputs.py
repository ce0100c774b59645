"""What the trainer hands the reward functions for one step's batch, laid out as TRL lays it out."""

from __future__ import annotations

from typing import Any, Sequence

from compilepass.standby.grpo.data import Example
from compilepass.standby.grpo.prompts import completions_in_format

__all__ = ["reward_inputs", "reward_trainer_state"]


def reward_inputs(examples: Sequence[Example], group_size: int, texts: Sequence[str],
                  completion_ids: Sequence[Sequence[int]], fmt: str, column_names: Sequence[str]) -> dict[str, Any]:
    """The keywords of :meth:`~compilepass.standby.grpo.rewards.RewardSet.score` for ``examples``
    (each generated ``group_size`` times, completions laid out group by group): ``prompts`` (each
    repeated), ``completions`` (decoded ``texts`` in the prompts' format ``fmt``),
    ``completion_ids`` and ``columns`` (each of ``column_names`` repeated alike)."""
    g = group_size
    return {
        "prompts": [ex.prompt for ex in examples for _ in range(g)],
        "completions": completions_in_format(texts, fmt),
        "completion_ids": [list(ids) for ids in completion_ids],
        "columns": {k: [ex.columns.get(k) for ex in examples for _ in range(g)] for k in column_names},
    }


def reward_trainer_state(step: int, max_steps: int, epoch: float):
    """A ``transformers.TrainerState`` as TRL's rewards see it while step ``step`` (1-based) is
    scored: ``global_step`` the optimizer steps done (``step - 1``), ``max_steps``, ``epoch`` (the
    fractional epoch of the data position)."""
    from transformers import TrainerState

    return TrainerState(global_step=step - 1, max_steps=max_steps, epoch=float(epoch))

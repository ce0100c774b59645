"""Reward functions and their weighted sum, called as TRL calls them.

A reward function is called with keywords (:mod:`~compilepass.standby.grpo.reward_calls`)::

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], answer=[...], <every other column>=[...],
       trainer_state=TrainerState, log_extra=fn, log_metric=fn) -> list[float | None]

one score per completion, every list aligned with the completions (each prompt repeated G times).
``completions`` are strings for standard prompts and ``[{"role": "assistant", "content": ...}]``
for conversational ones (:mod:`~compilepass.standby.grpo.prompts`); ``completion_ids`` are each
completion's token ids (up to and including EOS); ``trainer_state`` is a
``transformers.TrainerState`` whose ``global_step`` counts the optimizer steps done, with
``max_steps`` and the fractional ``epoch``; ``log_metric(name, value)`` adds a number to the step's
metrics (the mean of a step's values); ``log_extra(column, values)`` is accepted and its values
kept in ``RewardSet.extra_columns`` (there is no completions table). A TRL reward function
(``def f(completions, **kwargs)``, those in ``trl.rewards``) works unchanged. ``async def``
functions are awaited together (``asyncio.gather``) after the sync ones.

A score of None skips that sample for that function, as in TRL: the weighted total is the sum over
the functions that scored it (NaN-ignoring); a completion no function scored has a NaN total and
an advantage of 0, and is left out of its group's mean and std.

Functions are built-in names (:mod:`~compilepass.standby.grpo.reward_builtins`),
``module:function`` / ``path/to/file.py:function`` (:mod:`~compilepass.standby.grpo.reward_resolve`)
or, from Python, callables (named by their ``__name__``; a name taken by an earlier callable gets
``_2``, ...).

:class:`RewardSet` scores a batch: ``total, parts = rewards.score(prompts, completions,
completion_ids=..., columns={...}, trainer_state=...)``. A function that raises, returns the
wrong number of scores, or a non-numeric or non-finite score (NaN included: return None to skip)
raises :class:`RewardError`, naming the function, the sample index and the (truncated) prompt; the
loop saves its state and exits with that one line. For a function that raises, the message quotes
that exception (type and message); the sample is found by calling the function again on one
sample at a time. A function needing a keyword no column gives (``solution`` for TRL's
``accuracy_reward`` on a dataset with an ``answer`` column) is named with the missing column
(:meth:`RewardSet.check_columns`, which the trainer calls before the first step).

Metric names: ``RewardSet.labels`` maps each function's name to a short label, its function name
(``rewards/contains_answer`` rather than ``rewards//tmp/x/myrewards.py:contains_answer``); a
label taken by an earlier function gets ``_2``, ``_3``, ... in listed order.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import defaultdict
from typing import Any, Callable, Mapping, Optional, Sequence

from compilepass.core.errors import CompilepassError, ConfigError
from compilepass.standby.grpo.prompts import prompt_text
from compilepass.standby.grpo.reward_builtins import (BUILTIN_REWARDS, copy_similarity, exact_match, extract_answer,
                                                      format_answer_tag, format_think_answer, normalize_answer,
                                                      repeat_letter)
from compilepass.standby.grpo.reward_calls import AsyncRunner, RewardCall
from compilepass.standby.grpo.reward_resolve import callable_name, resolve_reward

log = logging.getLogger(__name__)

__all__ = [
    "RewardError", "RewardSet", "RewardFn", "BUILTIN_REWARDS", "resolve_reward", "extract_answer",
    "normalize_answer", "exact_match", "format_answer_tag", "format_think_answer", "repeat_letter",
    "copy_similarity", "metric_labels", "RESERVED_KEYWORDS",
]

RewardFn = Callable[..., Sequence[Optional[float]]]

#: Keywords the trainer fills; a dataset column cannot take one of these names.
RESERVED_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


class RewardError(CompilepassError):
    """A reward function failed; the message names the function, the sample and its prompt."""


def _short(prompt: Any, n: int = 60) -> str:
    text = prompt_text(prompt).replace("\n", "\\n")
    return repr(text if len(text) <= n else text[: n - 3] + "...")


class RewardSet:
    """Weighted reward functions. ``score`` returns ``(total, parts)``: ``total`` a float32 tensor
    [N] = the NaN-ignoring sum of weight_i * part_i (NaN where no function scored the sample), and
    ``parts`` {name: float32 tensor [N]} (unweighted; NaN where the function returned None).
    ``close()`` stops the event loop of the async functions (if one was started)."""

    def __init__(self, functions: Sequence[tuple[str, RewardFn, float]]):
        if not functions:
            raise ConfigError("no reward functions: list at least one in reward.functions")
        names = [n for n, _, _ in functions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"reward {dup[0]!r} is listed twice")
        for n, f, _ in functions:
            if not callable(f):
                raise ConfigError(f"reward {n!r} is {type(f).__name__}, not callable")
        self.functions = [(n, f, float(w)) for n, f, w in functions]
        self.calls = {n: RewardCall(n, f) for n, f, _ in functions}
        self.labels = metric_labels(names)
        self.logged_metrics: dict[str, float] = {}  # log_metric's values of the last score(), averaged
        self.extra_columns: dict[str, list] = {}  # log_extra's columns of the last score()
        self._runner = AsyncRunner()

    @classmethod
    def from_specs(cls, specs: Sequence[Any], default: Sequence[str] = ()) -> "RewardSet":
        """From names, callables, ``(name or callable, weight)`` pairs or ``RewardSpec``-like
        objects (``.name``, ``.weight``). Empty ``specs`` falls back to ``default`` names with
        weight 1 (a built-in task's ``default_rewards``)."""
        if callable(specs) or isinstance(specs, str):
            specs = [specs]
        items: list[tuple[str, RewardFn, float]] = []
        taken: set[str] = set()
        for spec in specs:
            if isinstance(spec, (tuple, list)):
                if len(spec) != 2:
                    raise ConfigError(f"a reward pair must be (name or function, weight), got {len(spec)} items")
                what, weight = spec
            elif isinstance(spec, str) or callable(spec):
                what, weight = spec, 1.0
            else:
                what, weight = spec.name, spec.weight
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise ConfigError(f"reward weight {weight!r} is not a number") from None
            if isinstance(what, str):
                items.append((what, resolve_reward(what), weight))
            elif callable(what):
                base = callable_name(what)
                name, k = base, 2
                while name in taken:
                    name, k = f"{base}_{k}", k + 1
                items.append((name, what, weight))
            else:
                raise ConfigError(f"a reward must be a name or a callable, not {type(what).__name__}")
            taken.add(items[-1][0])
        if not items:
            items = [(n, resolve_reward(n), 1.0) for n in default]
        return cls(items)

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.functions]

    def check_columns(self, columns: Sequence[str], keywords: Sequence[str] = RESERVED_KEYWORDS) -> None:
        """ConfigError (one line) for a column named like a reserved keyword, or a function whose
        required parameter neither a column nor ``keywords`` fills."""
        clash = [c for c in columns if c in RESERVED_KEYWORDS]
        if clash:
            raise ConfigError(f"dataset column {clash[0]!r} has the name of a reward function argument "
                              f"({', '.join(RESERVED_KEYWORDS)}); rename the column")
        for name, call in self.calls.items():
            missing = call.missing([*keywords, *columns])
            if missing:
                raise ConfigError(f"reward {name!r} needs {', '.join(map(repr, missing))}, which no dataset column "
                                  f"gives (columns: {', '.join(columns) or 'none'})")

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], *,
              completion_ids: Optional[Sequence[Sequence[int]]] = None,
              columns: Optional[Mapping[str, Sequence[Any]]] = None, trainer_state: Any = None):
        """Score N completions. ``prompts``, ``completion_ids`` and every column are per completion
        (repeat each prompt G times). Raises RewardError."""
        import torch

        n = len(completions)
        columns = dict(columns or {})
        per_sample = {"prompts": list(prompts), "completions": list(completions)}
        if completion_ids is not None:
            per_sample["completion_ids"] = [list(ids) for ids in completion_ids]
        for key, values in list(per_sample.items()) + list(columns.items()):
            if len(values) != n:
                raise ValueError(f"score() needs one value per completion: {key!r} has {len(values)} for {n}")
        try:
            self.check_columns(list(columns), [*per_sample, *(["trainer_state"] if trainer_state is not None else []),
                                               "log_extra", "log_metric"])
        except ConfigError as e:
            raise RewardError(str(e)) from None
        per_sample.update({k: list(v) for k, v in columns.items()})
        metrics: dict[str, list[float]] = defaultdict(list)
        self.extra_columns = {}
        shared = {"log_extra": self.extra_columns.__setitem__,
                  "log_metric": lambda key, value: metrics[key].append(float(value))}
        if trainer_state is not None:
            shared["trainer_state"] = trainer_state
        full = {**per_sample, **shared}
        prompts = per_sample["prompts"]

        outputs: dict[str, Any] = {}
        pending: list[tuple[str, Any]] = []
        for name, call in self.calls.items():  # the sync ones run here; async ones return awaitables
            try:
                out = call(full, n)
            except Exception as e:  # noqa: BLE001 - user code; located and reported in one line
                raise self._locate_failure(call, e, per_sample, shared, n) from None
            if inspect.isawaitable(out):
                pending.append((name, out))
            else:
                outputs[name] = out
        for (name, _), out in zip(pending, self._runner.run([aw for _, aw in pending])):
            if isinstance(out, BaseException):
                if not isinstance(out, Exception):
                    raise out
                raise self._locate_failure(self.calls[name], out, per_sample, shared, n) from None
            outputs[name] = out

        parts = {name: torch.tensor(self._values(name, outputs[name], n, prompts), dtype=torch.float32)
                 for name in self.calls}
        stacked = torch.stack([parts[name] for name, _, _ in self.functions], 1)
        weights = torch.tensor([w for _, _, w in self.functions], dtype=torch.float32)
        total = (stacked * weights).nansum(1)
        unscored = torch.isnan(stacked).all(1)
        if bool(unscored.any()):
            total[unscored] = float("nan")
            first = int(unscored.nonzero()[0, 0])
            log.warning("no reward function scored %d of %d completions (all returned None; first: sample %d, "
                        "prompt %s): their advantage is 0", int(unscored.sum()), n, first, _short(prompts[first]))
        self.logged_metrics = {k: sum(v) / len(v) for k, v in metrics.items() if v}
        return total, parts

    @staticmethod
    def _values(name: str, scores: Any, n: int, prompts: Sequence[Any]) -> list[float]:
        try:
            scores = list(scores)
        except TypeError:
            raise RewardError(f"reward {name!r} returned {type(scores).__name__}, not a list of {n} floats") from None
        if len(scores) != n:
            raise RewardError(f"reward {name!r} returned {len(scores)} scores for {n} completions")
        values = []
        for i, s in enumerate(scores):
            if s is None:
                values.append(math.nan)
                continue
            try:
                v = float(s)
            except (TypeError, ValueError):
                raise RewardError(f"reward {name!r} returned {s!r} (not a number) for sample {i} "
                                  f"(prompt {_short(prompts[i])})") from None
            if not math.isfinite(v):
                raise RewardError(f"reward {name!r} returned {v} for sample {i} (prompt {_short(prompts[i])}); "
                                  f"return None to skip a sample")
            values.append(v)
        return values

    def _locate_failure(self, call: RewardCall, error: BaseException, per_sample: Mapping[str, list],
                        shared: Mapping[str, Any], n: int) -> RewardError:
        """Rerun sample by sample to name the first one that fails; the message quotes ``error``,
        the exception of the call that failed (a rerun may fail differently, or not at all)."""
        what = _exception_line(error)
        prompts = per_sample["prompts"]
        quiet = {**shared, "log_extra": lambda *a: None, "log_metric": lambda *a: None}
        for i in range(n):
            try:
                out = call({**{k: [v[i]] for k, v in per_sample.items()}, **quiet}, 1)
                if inspect.isawaitable(out):
                    (out,) = self._runner.run([out])
                    if isinstance(out, Exception):
                        raise out
            except Exception:  # noqa: BLE001
                return RewardError(f"reward {call.name!r} failed on sample {i} (prompt {_short(prompts[i])}): {what}")
        return RewardError(f"reward {call.name!r} failed on the batch of {n} (no single sample fails "
                           f"alone; first prompt {_short(prompts[0]) if prompts else '-'}): {what}")

    def close(self) -> None:
        """Stop the async functions' event loop (a later ``score`` starts another)."""
        self._runner.close()


def _exception_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (whitespace collapsed, long messages cut)."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def metric_labels(names: Sequence[str]) -> dict[str, str]:
    """Each reward name -> its metric label: the function name (the part after the last ``:`` and
    the last ``.``), with ``_2``, ``_3``, ... when an earlier name took it."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        base = name.rpartition(":")[2].rpartition(".")[2] or name
        label, k = base, 2
        while label in taken:
            label, k = f"{base}_{k}", k + 1
        taken.add(label)
        out[name] = label
    return out

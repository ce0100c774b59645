"""Reward functions and their weighted sum.

Every reward function has the signature::

    fn(prompts: list[str], completions: list[str], answers: list[str | None], **meta) -> list[float]

with one score per completion. ``meta`` holds each ``Example.meta`` key as a list aligned with the
completions (None where an example lacks the key); functions should accept and ignore unknown
keywords (``**kwargs``).

Built-ins (:data:`BUILTIN_REWARDS`): ``exact_match`` (the extracted final answer equals the
reference after normalization), ``format_answer_tag`` (``<answer>...</answer>`` present),
``format_think_answer`` (``<think>...</think>`` then ``<answer>...</answer>``), and the toy tasks'
shaped rewards ``repeat_letter`` and ``copy_similarity``. A user function is named
``module:function`` (imported with importlib) or ``path/to/file.py:function``.

:class:`RewardSet` scores a batch: ``total, parts = rewards.score(prompts, completions, answers,
meta)``. A function that raises, returns the wrong number of scores, or a non-finite or
non-numeric score raises :class:`RewardError`, naming the function, the sample index and the
(truncated) prompt; the loop saves its state and exits with that one line. For a function that
raises, the message quotes that exception (type and message); the sample is found by calling the
function again on one sample at a time.

Metric names: ``RewardSet.labels`` maps each function's name to a short label, its function name
(``rewards/contains_answer`` rather than ``rewards//tmp/x/myrewards.py:contains_answer``); a
label taken by an earlier function gets ``_2``, ``_3``, ... in listed order.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from compilepass.core.errors import CompilepassError, ConfigError

__all__ = [
    "RewardError", "RewardSet", "RewardFn", "BUILTIN_REWARDS", "resolve_reward", "extract_answer",
    "normalize_answer", "exact_match", "format_answer_tag", "format_think_answer", "repeat_letter",
    "copy_similarity", "metric_labels",
]

RewardFn = Callable[..., Sequence[float]]


class RewardError(CompilepassError):
    """A reward function failed; the message names the function, the sample and its prompt."""


# ------------------------------------------------------------------------------------------------
# Answer extraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_ANSWER_COLON = re.compile(r"answer\s*(?:is)?\s*:", re.I)


def extract_answer(text: str) -> Optional[str]:
    """The final answer in a completion, by the first rule that applies:
    the text after the last ``####``; the last ``<answer>...</answer>``; the text after the last
    ``answer:`` (case-insensitive); the last number. None when nothing applies."""
    if "####" in text:
        rest = text.rsplit("####", 1)[1].strip()
        return rest.splitlines()[0].strip() if rest else ""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    colons = list(_ANSWER_COLON.finditer(text))
    if colons:
        rest = text[colons[-1].end():].strip()
        return rest.splitlines()[0].strip() if rest else ""
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    return None


def normalize_answer(text: Optional[str]) -> Optional[str]:
    """Lowercase, strip spaces, ``$``, surrounding quotes/brackets and a trailing period; a number
    becomes its canonical form (``1,000.0`` -> ``1000``, ``0.50`` -> ``0.5``)."""
    if text is None:
        return None
    s = text.strip().lower()
    s = s.replace("$", "").replace("\\boxed", "")
    s = s.strip().strip("{}()[]\"'` ").rstrip(".").strip()
    num = s.replace(",", "")
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", num):
        value = float(num)
        if value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        return repr(value)
    return re.sub(r"\s+", " ", s)


# ------------------------------------------------------------------------------------------------
# Built-in rewards


def exact_match(prompts, completions, answers, **meta) -> list[float]:
    """1.0 when the completion's extracted final answer equals the reference (both normalized).
    A completion with a reference answer of None is an error (the dataset has no answers)."""
    out = []
    for i, (completion, answer) in enumerate(zip(completions, answers)):
        if answer is None:
            raise ValueError("exact_match needs a reference answer and this sample has none")
        extracted = normalize_answer(extract_answer(completion))
        out.append(1.0 if extracted is not None and extracted == normalize_answer(str(answer)) else 0.0)
    return out


def format_answer_tag(prompts, completions, answers, **meta) -> list[float]:
    """1.0 when the completion contains ``<answer>...</answer>``."""
    return [1.0 if _ANSWER_TAG.search(c) else 0.0 for c in completions]


_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.S)


def format_think_answer(prompts, completions, answers, **meta) -> list[float]:
    """1.0 when the whole completion is ``<think>...</think>`` followed by ``<answer>...</answer>``."""
    return [1.0 if _THINK_ANSWER.match(c) else 0.0 for c in completions]


SHAPING_WIDTH = 32  # bytes: a character this far from the target earns nothing


def _closeness(ch: str, target: str) -> float:
    d = abs(ord(ch) - ord(target))
    return max(0.0, 1.0 - d / SHAPING_WIDTH)


def repeat_letter(prompts, completions, answers, **meta) -> list[float]:
    """The mean over the completion's characters of their closeness to the reference letter:
    1 for the letter itself, falling linearly to 0 at 32 code points away. An empty completion
    scores 0. Uniformly random bytes score about 0.12."""
    out = []
    for completion, answer in zip(completions, answers):
        if not answer:
            raise ValueError("repeat_letter needs a one-letter reference answer")
        target = answer[0]
        out.append(sum(_closeness(ch, target) for ch in completion) / len(completion) if completion else 0.0)
    return out


def copy_similarity(prompts, completions, answers, **meta) -> list[float]:
    """Per-position closeness of the completion's first len(answer) characters to the answer
    (missing characters score 0), averaged over the answer's length."""
    out = []
    for completion, answer in zip(completions, answers):
        if not answer:
            raise ValueError("copy_similarity needs a reference answer")
        out.append(sum(_closeness(c, t) for c, t in zip(completion, answer)) / len(answer))
    return out


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "format_answer_tag": format_answer_tag,
    "format_think_answer": format_think_answer,
    "repeat_letter": repeat_letter,
    "copy_similarity": copy_similarity,
}


# ------------------------------------------------------------------------------------------------
# Resolution and scoring


def resolve_reward(name: str) -> RewardFn:
    """A built-in name, ``module:function`` or ``path/to/file.py:function`` -> the callable.
    Raises ConfigError (one line) for an unknown name, a module that fails to import or a missing
    or non-callable attribute."""
    if ":" not in name:
        if name in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[name]
        raise ConfigError(f"unknown reward {name!r}; valid: {', '.join(BUILTIN_REWARDS)} or module:function")
    module_name, _, attr = name.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"reward {name!r} must look like module:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"reward {name!r}: file {module_name!r} not found")
        mod_key = f"compilepass_reward_{abs(hash(str(path.resolve())))}"
        try:
            spec = importlib.util.spec_from_file_location(mod_key, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_key] = module
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - any import-time failure is the user's, reported in one line
            sys.modules.pop(mod_key, None)
            raise ConfigError(f"reward {name!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                raise ConfigError(f"reward {name!r}: no module named {e.name!r} (is it on PYTHONPATH?)") from None
            raise ConfigError(f"reward {name!r}: importing {module_name!r} failed: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"reward {name!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: {attr!r} in {module_name!r} is not callable")
    return fn


def _short(text: str, n: int = 60) -> str:
    text = text.replace("\n", "\\n")
    return repr(text if len(text) <= n else text[: n - 3] + "...")


class RewardSet:
    """Weighted reward functions. ``score`` returns ``(total, parts)``: ``total`` a float32 tensor
    [N] = sum_i weight_i * part_i, and ``parts`` {name: float32 tensor [N]} (unweighted)."""

    def __init__(self, functions: Sequence[tuple[str, RewardFn, float]]):
        if not functions:
            raise ConfigError("no reward functions: list at least one in reward.functions")
        names = [n for n, _, _ in functions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"reward {dup[0]!r} is listed twice")
        self.functions = [(n, f, float(w)) for n, f, w in functions]
        self.labels = metric_labels(names)

    @classmethod
    def from_specs(cls, specs: Sequence[Any], default: Sequence[str] = ()) -> "RewardSet":
        """From ``RewardSpec``-like objects (``.name``, ``.weight``), ``(name, weight)`` pairs or
        names. Empty ``specs`` falls back to ``default`` names with weight 1 (a built-in task's
        ``default_rewards``)."""
        items = []
        for spec in specs:
            if isinstance(spec, str):
                name, weight = spec, 1.0
            elif isinstance(spec, (tuple, list)):
                name, weight = spec
            else:
                name, weight = spec.name, spec.weight
            items.append((name, float(weight)))
        if not items:
            items = [(n, 1.0) for n in default]
        return cls([(n, resolve_reward(n), w) for n, w in items])

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.functions]

    def score(self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[Optional[str]],
              meta: Optional[Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]] = None):
        """Score N completions. ``prompts`` and ``answers`` are per completion (repeat each prompt G
        times). ``meta``: per-sample dicts (``Example.meta``) or a dict of lists. Raises RewardError."""
        import torch

        n = len(completions)
        if len(prompts) != n or len(answers) != n:
            raise ValueError(f"score() needs one prompt and answer per completion: "
                             f"{len(prompts)} prompts, {len(completions)} completions, {len(answers)} answers")
        kw = _meta_kwargs(meta, n)
        prompts, completions, answers = list(prompts), list(completions), list(answers)
        total = torch.zeros(n, dtype=torch.float32)
        parts = {}
        for name, fn, weight in self.functions:
            try:
                scores = fn(prompts, completions, answers, **kw)
            except Exception as e:  # noqa: BLE001 - user code; located and reported in one line
                raise self._locate_failure(name, fn, e, prompts, completions, answers, kw) from None
            try:
                scores = list(scores)
            except TypeError:
                raise RewardError(f"reward {name!r} returned {type(scores).__name__}, not a list of {n} floats") from None
            if len(scores) != n:
                raise RewardError(f"reward {name!r} returned {len(scores)} scores for {n} completions")
            values = []
            for i, s in enumerate(scores):
                try:
                    v = float(s)
                except (TypeError, ValueError):
                    raise RewardError(f"reward {name!r} returned {s!r} (not a number) for sample {i} "
                                      f"(prompt {_short(prompts[i])})") from None
                if not math.isfinite(v):
                    raise RewardError(f"reward {name!r} returned {v} for sample {i} (prompt {_short(prompts[i])})")
                values.append(v)
            part = torch.tensor(values, dtype=torch.float32)
            parts[name] = part
            total += weight * part
        return total, parts

    @staticmethod
    def _locate_failure(name, fn, error, prompts, completions, answers, kw) -> RewardError:
        """Rerun sample by sample to name the first one that fails; the message quotes ``error``,
        the exception of the call that failed (a rerun may fail differently, or not at all)."""
        what = _exception_line(error)
        for i in range(len(completions)):
            try:
                fn([prompts[i]], [completions[i]], [answers[i]], **{k: [v[i]] for k, v in kw.items()})
            except Exception:  # noqa: BLE001
                return RewardError(f"reward {name!r} failed on sample {i} (prompt {_short(prompts[i])}): {what}")
        return RewardError(f"reward {name!r} failed on the batch of {len(completions)} (no single sample fails "
                           f"alone; first prompt {_short(prompts[0]) if prompts else '-'}): {what}")


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


def _meta_kwargs(meta, n: int) -> dict[str, list]:
    if meta is None:
        return {}
    if isinstance(meta, Mapping):
        out = {}
        for k, v in meta.items():
            v = list(v)
            if len(v) != n:
                raise ValueError(f"meta[{k!r}] has {len(v)} values for {n} completions")
            out[k] = v
        return out
    meta = list(meta)
    if len(meta) != n:
        raise ValueError(f"meta has {len(meta)} entries for {n} completions")
    keys: list[str] = []
    for m in meta:
        for k in m:
            if k not in keys:
                keys.append(k)
    reserved = {"prompts", "completions", "answers"}
    return {k: [m.get(k) for m in meta] for k in keys if k not in reserved}

"""The built-in reward functions, written as TRL's are: called with keywords, one score per completion.

Each takes ``completions`` (strings, or ``[{"role": "assistant", "content": ...}]`` for
conversational prompts) and, where it needs a reference, the dataset's ``answer`` column, and
ignores every other keyword (``**kwargs``):

- ``exact_match(completions, answer)``: 1.0 when the completion's extracted final answer
  (:func:`extract_answer`) equals the reference, both normalized (:func:`normalize_answer`);
- ``format_answer_tag(completions)``: 1.0 when ``<answer>...</answer>`` is present;
- ``format_think_answer(completions)``: 1.0 when the whole completion is ``<think>...</think>``
  then ``<answer>...</answer>``;
- ``repeat_letter(completions, answer)`` and ``copy_similarity(completions, answer)``: the toy
  tasks' shaped rewards (:mod:`~compilepass.standby.grpo.builtin_tasks`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

__all__ = ["BUILTIN_REWARDS", "completion_text", "extract_answer", "normalize_answer", "exact_match",
           "format_answer_tag", "format_think_answer", "repeat_letter", "copy_similarity", "SHAPING_WIDTH"]


def completion_text(completion: Any) -> str:
    """A completion's text: the string itself, or the contents of a conversational completion's messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion)


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


def exact_match(completions: Sequence[Any], answer: Sequence[Any], **kwargs) -> list[float]:
    """1.0 when the completion's extracted final answer equals the reference (both normalized).
    A completion whose reference answer is None is an error (the dataset has no answers there)."""
    out = []
    for completion, ref in zip(completions, answer):
        if ref is None:
            raise ValueError("exact_match needs a reference answer and this sample has none")
        extracted = normalize_answer(extract_answer(completion_text(completion)))
        out.append(1.0 if extracted is not None and extracted == normalize_answer(str(ref)) else 0.0)
    return out


def format_answer_tag(completions: Sequence[Any], **kwargs) -> list[float]:
    """1.0 when the completion contains ``<answer>...</answer>``."""
    return [1.0 if _ANSWER_TAG.search(completion_text(c)) else 0.0 for c in completions]


_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.S)


def format_think_answer(completions: Sequence[Any], **kwargs) -> list[float]:
    """1.0 when the whole completion is ``<think>...</think>`` followed by ``<answer>...</answer>``."""
    return [1.0 if _THINK_ANSWER.match(completion_text(c)) else 0.0 for c in completions]


SHAPING_WIDTH = 32  # code points: a character this far from the target earns nothing


def _closeness(ch: str, target: str) -> float:
    d = abs(ord(ch) - ord(target))
    return max(0.0, 1.0 - d / SHAPING_WIDTH)


def repeat_letter(completions: Sequence[Any], answer: Sequence[Any], **kwargs) -> list[float]:
    """The mean over the completion's characters of their closeness to the reference letter:
    1 for the letter itself, falling linearly to 0 at 32 code points away. An empty completion
    scores 0. Uniformly random bytes score about 0.12."""
    out = []
    for completion, ref in zip(completions, answer):
        if ref is None or str(ref) == "":
            raise ValueError("repeat_letter needs a one-letter reference answer")
        target, text = str(ref)[0], completion_text(completion)
        out.append(sum(_closeness(ch, target) for ch in text) / len(text) if text else 0.0)
    return out


def copy_similarity(completions: Sequence[Any], answer: Sequence[Any], **kwargs) -> list[float]:
    """Per-position closeness of the completion's first len(answer) characters to the answer
    (missing characters score 0), averaged over the answer's length."""
    out = []
    for completion, ref in zip(completions, answer):
        if ref is None or str(ref) == "":
            raise ValueError("copy_similarity needs a reference answer")
        ref = str(ref)
        out.append(sum(_closeness(c, t) for c, t in zip(completion_text(completion), ref)) / len(ref))
    return out


BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {
    "exact_match": exact_match,
    "format_answer_tag": format_answer_tag,
    "format_think_answer": format_think_answer,
    "repeat_letter": repeat_letter,
    "copy_similarity": copy_similarity,
}

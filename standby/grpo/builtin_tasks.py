"""Built-in offline prompt tasks (``data.dataset: builtin:NAME``), deterministic in the seed, no download.

Each task makes rows with the columns ``prompt`` (a string: the standard format), ``answer``,
``task`` and ``index``, and names the built-in rewards that score it (``BUILTIN_TASKS[name].rewards``):

- ``repeat``: "Repeat the letter c: " -> answer "c" (c in a..h). Scored by ``repeat_letter``, a
  shaped reward (1 for the letter, partial credit for bytes near it). A random-weight tiny model
  samples bytes about uniformly and scores ~0.12 with spread inside every group; GRPO pushes it
  up within a few dozen steps. This is the learning test's task.
- ``copy``: "Copy: abcd\\n" -> "abcd" (4 letters of a..h), scored by ``copy_similarity``
  (per-position shaped credit). Harder: it needs attention to the prompt.
- ``arithmetic``: "What is 12 + 7? Answer: " -> "19" (addition up to 2 digits, multiplication up
  to 1 x 2 digits), scored by ``exact_match``. For real models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

__all__ = ["BuiltinTask", "BUILTIN_TASKS", "REPEAT_LETTERS", "builtin_rows"]

REPEAT_LETTERS = "abcdefgh"


def _repeat(rng: random.Random) -> tuple[str, str]:
    c = rng.choice(REPEAT_LETTERS)
    return f"Repeat the letter {c}: ", c


def _copy(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(REPEAT_LETTERS) for _ in range(4))
    return f"Copy: {s}\n", s


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op, result = "+", a + b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 99)
        op, result = "*", a * b
    return f"What is {a} {op} {b}? Answer: ", str(result)


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    make: Callable[[random.Random], tuple[str, str]]  # (prompt, answer)
    rewards: tuple[str, ...]  # built-in reward names that score this task
    description: str


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "repeat": BuiltinTask("repeat", _repeat, ("repeat_letter",),
                          "repeat a letter a..h; shaped reward, learnable by the tiny preset"),
    "copy": BuiltinTask("copy", _copy, ("copy_similarity",), "copy 4 letters; per-position shaped reward"),
    "arithmetic": BuiltinTask("arithmetic", _arithmetic, ("exact_match",),
                              "small additions and multiplications with integer answers"),
}


def builtin_rows(name: str, seed: int, size: int) -> list[dict]:
    """``size`` rows of task ``name``; the same (name, seed, size) gives the same rows. The caller
    checks ``name`` (a KeyError otherwise)."""
    task = BUILTIN_TASKS[name]
    rng = random.Random(f"compilepass-builtin:{name}:{seed}")  # str seeds hash deterministically
    rows = []
    for i in range(size):
        prompt, answer = task.make(rng)
        rows.append({"prompt": prompt, "answer": answer, "task": name, "index": i})
    return rows

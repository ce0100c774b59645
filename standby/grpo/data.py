"""Prompts for GRPO: datasets, built-in offline tasks, a toy tokenizer, a resumable batch iterator.

- :class:`PromptDataset` is a Hugging Face ``datasets.Dataset`` with a ``prompt`` column, in one of
  TRL's two formats (:mod:`~compilepass.standby.grpo.prompts`: a string, or a list of
  ``{role, content}`` messages); every other column (``answer``, ``solution``, ...) reaches the
  reward functions as a keyword list. :func:`load_dataset` takes ``data.dataset`` as written in the
  config: ``builtin:NAME`` (:mod:`~compilepass.standby.grpo.builtin_tasks`, deterministic in the
  seed, no download), a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.arrow`` file
  or a ``save_to_disk`` folder (:mod:`~compilepass.standby.grpo.dataset_files`), or, from Python,
  a ``datasets.Dataset`` / ``DatasetDict`` / list of row dicts. Nothing is downloaded.
- :class:`PromptBatcher` yields fixed-size batches of :class:`Example` rows forever, reshuffling
  each epoch. Its ``state_dict()`` (epoch, position, seed, dataset size and content fingerprint;
  plain ints and strings) restored with ``load_state_dict()`` makes a resumed run, in this process
  or a new one, draw exactly the prompts the interrupted run would have drawn next.
- :class:`ToyTokenizer` is a byte-level tokenizer (vocab 256 with pad/eos/unk) for the random-weight
  presets; :func:`load_tokenizer` returns it for a preset and wraps a local Hugging Face
  directory's tokenizer (:class:`HFTokenizer`) with the same small interface.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

from compilepass.core.errors import ConfigError
from compilepass.core.shapes import resolve_model_source
from compilepass.standby.grpo.builtin_tasks import BUILTIN_TASKS, REPEAT_LETTERS, BuiltinTask, builtin_rows
from compilepass.standby.grpo.dataset_files import DatasetError, as_dataset, line_of_row, read_source
from compilepass.standby.grpo.prompts import dataset_format

__all__ = [
    "Example", "PromptDataset", "PromptBatcher", "DatasetError", "BuiltinTask", "BUILTIN_TASKS",
    "load_dataset", "ToyTokenizer", "HFTokenizer", "load_tokenizer", "REPEAT_LETTERS",
]


@dataclass
class Example:
    """One dataset row: its ``prompt`` (a string or a list of messages) and every other column."""
    prompt: Any
    columns: dict = field(default_factory=dict)

    @property
    def answer(self) -> Any:
        """The ``answer`` column's value (None when the dataset has none)."""
        return self.columns.get("answer")


# ------------------------------------------------------------------------------------------------
# Datasets


class PromptDataset(Sequence[Example]):
    """A ``datasets.Dataset`` (``.data``) of prompts with a name (the source), its prompt format
    (``.format``: ``"standard"`` or ``"conversational"``), its other columns (``.column_names``)
    and a content fingerprint. Every prompt is checked when it is built (DatasetError naming the
    row, and the line of a JSON-lines file)."""

    def __init__(self, data: Any, name: str = "dataset", task: str | None = None,
                 path: str | os.PathLike | None = None):
        data = as_dataset(data)
        if data.num_rows == 0:
            raise DatasetError(f"dataset {name!r} has no examples")
        if "prompt" not in data.column_names:
            raise DatasetError(f"dataset {name!r} has no \"prompt\" column "
                               f"(columns: {', '.join(data.column_names) or 'none'})")
        self.data = data
        self.name = name
        self.task = task  # the built-in task name, or None
        self.path = path
        self.format = dataset_format(data["prompt"], self._where)
        self.column_names = [c for c in data.column_names if c != "prompt"]
        self._fingerprint: Optional[str] = None

    def _where(self, row: int) -> str:
        line = line_of_row(self.path, row) if self.path is not None else None
        return f"{self.name}:{line}" if line is not None else f"{self.name} row {row}"

    def __len__(self) -> int:
        return self.data.num_rows

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.rows(range(*i.indices(len(self))))
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of a dataset of {len(self)}")
        return self.rows([i % len(self)])[0]

    def __iter__(self) -> Iterator[Example]:
        for lo in range(0, len(self), 1024):
            yield from self.rows(range(lo, min(lo + 1024, len(self))))

    def rows(self, indices: Sequence[int]) -> list[Example]:
        """The examples at ``indices`` (in that order; repeats allowed), read in one call."""
        indices = list(indices)
        if not indices:
            return []
        batch = self.data[indices]
        prompts = batch["prompt"]
        others = {k: batch[k] for k in self.column_names}
        return [Example(prompts[j], {k: v[j] for k, v in others.items()}) for j in range(len(indices))]

    def fingerprint(self) -> str:
        """A short hash of every column's content (names, order, values), to notice a changed dataset
        on resume. The same data gives the same hash in any process."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.data.column_names).encode())
            for batch in self.data.iter(batch_size=1024):
                h.update(json.dumps(batch, sort_keys=True, ensure_ascii=False,
                                    default=_hashable).encode("utf-8", "surrogatepass"))
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def default_rewards(self) -> tuple[str, ...]:
        """The built-in task's reward names; empty for any other dataset."""
        return BUILTIN_TASKS[self.task].rewards if self.task in BUILTIN_TASKS else ()

    @classmethod
    def builtin(cls, name: str, seed: int = 0, size: int = 1000) -> "PromptDataset":
        """``size`` examples of a built-in task; the same (name, seed, size) gives the same rows."""
        if name not in BUILTIN_TASKS:
            raise DatasetError(f"unknown built-in task {name!r}; valid: {', '.join('builtin:' + n for n in BUILTIN_TASKS)}")
        if size < 1:
            raise DatasetError(f"built-in task size must be >= 1 (got {size})")
        import datasets

        return cls(datasets.Dataset.from_list(builtin_rows(name, seed, size)), name=f"builtin:{name}", task=name)

    @classmethod
    def from_source(cls, source: str | os.PathLike, split: str = "train") -> "PromptDataset":
        """A local file or ``save_to_disk`` folder, read through ``datasets``; DatasetError names it."""
        return cls(read_source(source, split), name=str(source), path=source)


def _hashable(obj: Any) -> str:
    """A stable stand-in for a value JSON cannot write (an image, an array): ``datasets``' own hash."""
    from datasets.fingerprint import Hasher

    return Hasher.hash(obj)


def load_dataset(source: Any, seed: int = 0, builtin_size: int = 1000, split: str = "train") -> PromptDataset:
    """``builtin:NAME`` or a local file / ``save_to_disk`` folder, as written in ``data.dataset``;
    or, from Python, a PromptDataset, a ``datasets.Dataset`` / ``DatasetDict`` (its ``split``) or
    a list of row dicts."""
    if isinstance(source, PromptDataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.startswith("builtin:"):
            return PromptDataset.builtin(text[len("builtin:"):], seed=seed, size=builtin_size)
        return PromptDataset.from_source(source, split=split)
    data = as_dataset(source, split)
    return PromptDataset(data, name=f"{type(data).__name__}({data.num_rows} rows)")


# ------------------------------------------------------------------------------------------------
# Batching


class PromptBatcher:
    """Endless fixed-size batches of examples. Epoch ``e``'s order is a permutation drawn from
    ``(seed, e)`` alone, so the whole position is (epoch, position): a batch that runs past the end
    of an epoch continues into the next one.

    >>> b = PromptBatcher(ds, 8, shuffle=True, seed=0); batch = b.next_batch()
    >>> state = b.state_dict()          # save with the checkpoint
    >>> b2 = PromptBatcher(ds, 8, shuffle=True, seed=0); b2.load_state_dict(state)
    >>> b2.next_batch() == b.next_batch()
    True
    """

    def __init__(self, dataset: PromptDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0):
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1 (got {batch_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._make_order(0)

    def _make_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Example]:
        indices = []
        while len(indices) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._make_order(self.epoch)
            indices.append(self._order[self.position])
            self.position += 1
        return self.dataset.rows(indices)

    def __iter__(self) -> Iterator[list[Example]]:
        return self

    def __next__(self) -> list[Example]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Plain ints/strings/bools (safe for ``torch.load(weights_only=True)`` and JSON)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "dataset_size": len(self.dataset),
                "fingerprint": self.dataset.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off. Raises ConfigError if the dataset, its seed or the
        shuffle setting changed since (the next prompts would not be the ones that were due)."""
        for key, now in (("dataset_size", len(self.dataset)), ("fingerprint", self.dataset.fingerprint()),
                         ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != now:
                raise ConfigError(f"cannot resume the data position: the checkpoint's {key} is {state[key]!r}, "
                                  f"the current run's is {now!r} (dataset {self.dataset.name!r} changed?)")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._make_order(self.epoch)


# ------------------------------------------------------------------------------------------------
# Tokenizers


class ToyTokenizer:
    """Byte-level: UTF-8 byte b -> id b, except bytes 0..2, which are the special ids
    pad (0), eos (1) and unk (2); those three control bytes encode to unk. Vocabulary 256, the
    tiny presets' size. ``decode`` drops pad and eos (and unk, ids >= 256) unless
    ``skip_special_tokens=False``; invalid UTF-8 decodes to U+FFFD."""

    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2
    bos_token_id = None
    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b if b > 2 else self.unk_token_id for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 3 <= i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out += {0: b"<pad>", 1: b"<eos>"}.get(i, b"<unk>")
        return out.decode("utf-8", errors="replace")

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __len__(self) -> int:
        return self.vocab_size


class HFTokenizer:
    """A transformers tokenizer behind ToyTokenizer's interface. ``pad_token_id`` falls back to
    ``eos_token_id`` (and that to 0) when the tokenizer has none. ``.hf`` is the wrapped object
    (for ``apply_chat_template`` and the like)."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.eos_token_id = hf_tokenizer.eos_token_id
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)
        self.bos_token_id = getattr(hf_tokenizer, "bos_token_id", None)
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(name_or_path: str | os.PathLike):
    """ToyTokenizer for a preset name; the directory's own tokenizer (``AutoTokenizer``, local
    files only) for a Hugging Face model directory. Raises ModelNotFoundError otherwise."""

    if resolve_model_source(name_or_path) == "preset":
        return ToyTokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {str(name_or_path)!r}: {str(e).splitlines()[0]}") from None
    return HFTokenizer(tok)

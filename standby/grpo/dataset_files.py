"""Reading a prompt dataset through Hugging Face ``datasets``: local files, saved folders, Python objects.

:func:`read_source` takes ``data.dataset`` as written in a config (not ``builtin:NAME``, which
:mod:`~compilepass.standby.grpo.data` handles):

- a file, by its suffix: ``.jsonl`` / ``.json`` (``datasets``' ``json`` builder: JSON lines, or one
  array of objects), ``.parquet``, ``.csv``, ``.arrow`` (an Arrow stream file, as ``save_to_disk``
  writes); read with ``datasets.load_dataset(builder, data_files=path, split="train")``, which
  caches the Arrow conversion in ``datasets``' cache (``HF_DATASETS_CACHE``) and needs no network;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (``datasets.load_from_disk``; a ``DatasetDict`` gives its ``split``).

:func:`as_dataset` takes what Python code hands over: a ``datasets.Dataset``, a ``DatasetDict``
(its ``split``) or a list of row dicts. An ``IterableDataset`` is refused: the resumable data
position needs rows by index.

A file ``datasets`` cannot read is a :class:`DatasetError` naming the file. For JSON files the
file is then read again line by line to name the first bad line (invalid JSON, a line that is not
an object, a column whose type changes from row to row); ``datasets``' own message is given
otherwise. ``datasets``' progress bars and its log lines are silenced while a file is read (and
restored after).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from compilepass.core.errors import ConfigError

__all__ = ["DatasetError", "SUFFIX_BUILDERS", "read_source", "as_dataset", "line_of_row"]


class DatasetError(ConfigError):
    """A dataset that cannot be used: a missing or unreadable file, a bad row (names file and row or line)."""


#: File suffix -> the ``datasets`` builder that reads it.
SUFFIX_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def read_source(source: str | os.PathLike, split: str = "train"):
    """The ``datasets.Dataset`` in file or saved folder ``source``. Raises DatasetError (one line)."""
    p = Path(source)
    if p.is_dir():
        return _load_saved(p, split)
    if not p.exists():
        raise DatasetError(f"dataset file {str(p)!r} not found")
    builder = SUFFIX_BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise DatasetError(f"dataset file {str(p)!r}: unknown format {p.suffix or '(no suffix)'!r}; use "
                           f"{', '.join(SUFFIX_BUILDERS)} or a folder written by save_to_disk")
    if p.stat().st_size == 0:
        raise DatasetError(f"dataset file {str(p)!r} has no examples")
    import datasets

    try:
        with _quiet_datasets():
            data = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as e:  # noqa: BLE001 - pyarrow / pandas / datasets errors of every kind: named in one line
        detail = _json_problem(p) if builder == "json" else None
        raise DatasetError(detail or f"dataset file {str(p)!r}: datasets cannot read it as {builder}: "
                           f"{_first_line(e)}") from None
    if builder == "json" and "prompt" not in data.column_names:
        detail = _json_problem(p)  # e.g. lines that are strings or arrays, which datasets reads as a "text" column
        if detail:
            raise DatasetError(detail)
    return data


def as_dataset(obj: Any, split: str = "train"):
    """A ``datasets.Dataset`` from a Dataset, a DatasetDict (``split``) or a list of row dicts."""
    import datasets

    if isinstance(obj, datasets.Dataset):
        return obj
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DatasetError(f"the DatasetDict has no split {split!r} (splits: {', '.join(obj) or 'none'}); "
                               f"set data.split")
        return obj[split]
    if isinstance(obj, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DatasetError("an IterableDataset cannot be resumed at a position; pass a datasets.Dataset "
                           "(e.g. Dataset.from_generator, or load_dataset(..., streaming=False))")
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        try:
            return datasets.Dataset.from_list(obj)
        except Exception as e:  # noqa: BLE001 - pyarrow's type errors
            raise DatasetError(f"the list of rows cannot become a datasets.Dataset: {_first_line(e)}") from None
    raise DatasetError(f"a dataset must be a datasets.Dataset, a DatasetDict or a list of row dicts, "
                       f"not {type(obj).__name__}")


def _load_saved(p: Path, split: str):
    if not ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        raise DatasetError(f"dataset folder {str(p)!r} was not written by save_to_disk "
                           f"(no state.json or dataset_dict.json)")
    import datasets

    try:
        with _quiet_datasets():
            loaded = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"dataset folder {str(p)!r}: datasets cannot load it: {_first_line(e)}") from None
    try:
        return as_dataset(loaded, split)
    except DatasetError as e:
        raise DatasetError(f"dataset folder {str(p)!r}: {e}") from None


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets``' progress bars off and its logger at ERROR+1 while reading, then as they were."""
    from datasets.utils import logging as ds_logging

    bars, level = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            ds_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    """``Type: first line`` of an exception (of the reader's, for datasets' generation error that wraps it)."""
    if type(e).__name__ == "DatasetGenerationError" and e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _json_rows(p: Path) -> tuple[list[tuple[int, Any]], Optional[str]]:
    """(line number, parsed value) of each row of a JSON-lines or JSON-array file, and the first
    syntax problem as ``"path:line: ..."`` (None when the file parses)."""
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):  # one JSON document: an array of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            return [], f"{p}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})"
        return [(1, r) for r in rows], None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            return out, f"{p}:{lineno}: invalid JSON: {e.msg} (column {e.colno})"
    return out, None


def _json_problem(p: Path) -> Optional[str]:
    """A one-line ``path:line: ...`` for the first line of a JSON file that explains why
    ``datasets`` failed, if one does."""
    try:
        rows, problem = _json_rows(p)
    except OSError as e:
        return f"dataset file {str(p)!r}: cannot read it: {e}"
    if problem:
        return problem
    if not rows:
        return f"dataset file {str(p)!r} has no examples"
    kinds: dict[str, tuple[str, int]] = {}
    for lineno, row in rows:
        if not isinstance(row, dict):
            return f"{p}:{lineno}: each row must be a JSON object, not {type(row).__name__}"
        for key, value in row.items():
            if value is None:
                continue
            kind = _json_kind(value)
            first = kinds.setdefault(key, (kind, lineno))
            if first[0] != kind:
                return (f"{p}:{lineno}: column {key!r} holds {kind} here but {first[0]} on line {first[1]}; "
                        f"datasets needs one type per column")
    return None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def line_of_row(path: str | os.PathLike, row: int) -> Optional[int]:
    """The line of a JSON-lines file that holds row ``row`` (0-based, blank lines skipped); None
    for other files or when it cannot be told."""
    p = Path(path)
    if p.suffix.lower() != ".jsonl" or not p.is_file():
        return None
    seen = -1
    with open(p, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == row:
                    return lineno
    return None

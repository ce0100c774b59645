"""Per-step metrics: an fsynced ``metrics.jsonl``, the trackers of ``run.report_to`` (TensorBoard,
wandb, trackio: :mod:`~compilepass.standby.grpo.trackers`), and a progress bar (or, when stderr is
not a terminal, one plain line per logged step).

``MetricsLogger(output_dir, resume_step=S)`` first drops every line of an existing
``metrics.jsonl`` whose step is > S (and a torn last line from a killed process), so after a
resume from the step-S checkpoint the file holds each step exactly once. A fresh run passes
``resume_step=None`` (the default), which empties an existing file. Each ``log(step, metrics)`` appends one JSON object ``{"step": ..., "time":
..., **metrics}`` and flushes and fsyncs it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from compilepass.core.atomic import write_bytes_atomic
from compilepass.core.errors import ConfigError
from compilepass.standby.grpo.trackers import TRACKERS, make_trackers, package_installed

__all__ = ["MetricsLogger", "ProgressBar", "PROGRESS_MODES", "peak_memory_gib", "read_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers; NaN/inf -> None-free strings JSON can hold."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # a multi-element tensor
            value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": valid JSON, visibly not a number
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn (unparsable) line ends the read."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    with open(p, "r", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                break
            out.append(rec)
    return out


class MetricsLogger:
    """Append-only step metrics under ``output_dir``.

    ``resume_step``: lines with ``step > resume_step`` are removed first; None (a fresh run)
    removes every line.
    ``report_to``: tracker names (:func:`~compilepass.standby.grpo.trackers.check_report_to`) that
    also get every numeric value of each record; ``tensorboard=True`` adds ``tensorboard``
    (``output_dir/tensorboard``). A tracker whose package is missing is a ConfigError.
    ``run_config``: the run's config, handed to wandb / trackio. ``keep_tail``: how many recent
    records :meth:`tail` can return.
    """

    def __init__(self, output_dir: str | os.PathLike, *, tensorboard: bool = False,
                 resume_step: int | None = None, keep_tail: int = 20, report_to: Sequence[str] = (),
                 run_config: dict | None = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        records = read_metrics(self.path)
        kept = [] if resume_step is None else [r for r in records if r["step"] <= resume_step]
        if self.path.exists() and (len(kept) != len(records) or self._has_trailing_garbage(len(records))):
            data = "".join(json.dumps(r) + "\n" for r in kept).encode()
            write_bytes_atomic(self.path, data)
        self._tail = kept[-keep_tail:]
        self._keep_tail = keep_tail
        names = list(report_to) + (["tensorboard"] if tensorboard and "tensorboard" not in report_to else [])
        if tensorboard and not _tensorboard_installed():
            raise ConfigError("run.tensorboard is true but the tensorboard package is not installed "
                              "(pip install tensorboard, or set run.tensorboard=false)")
        self._trackers = make_trackers(names, self.output_dir, resume_step, run_config)
        self._file = open(self.path, "a", encoding="utf-8")

    def _has_trailing_garbage(self, n_good: int) -> bool:
        with open(self.path, "r", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.strip()]
        return len(lines) != n_good or (self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n"))

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Append ``{"step": step, "time": unix time, **metrics}``; returns the record written.
        Tensor values are converted with ``.item()``."""
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({str(k): _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._tail.append(record)
        del self._tail[:-self._keep_tail]
        if self._trackers:
            scalars = {k: v for k, v in record.items()
                       if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for tracker in self._trackers:
                tracker.log(step, scalars)
        return record

    @property
    def trackers(self) -> list[str]:
        """The names of the trackers this logger reports to."""
        return [t.name for t in self._trackers]

    def tail(self, n: int = 5) -> list[dict]:
        """The last ``n`` records (for ``save_checkpoint(metrics_tail=...)``)."""
        return list(self._tail[-n:]) if n > 0 else []

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensorboard_installed() -> bool:
    return package_installed(TRACKERS["tensorboard"])


def peak_memory_gib(device: Any = None) -> float:
    """Peak memory in GiB: ``torch.cuda.max_memory_allocated`` on a CUDA device, else the
    process's peak resident set size."""
    import torch

    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


PROGRESS_MODES = (True, False, "auto", "lines")


class ProgressBar:
    """What a run shows on stderr per step. Use as a context manager.

    ``enabled``: ``True`` a rich progress bar with the latest reward, KL, tokens/s and peak
    memory; ``"lines"`` one plain line per logged step (:meth:`format_line`), flushed, for logs
    that are not a terminal (nohup, CI, a pipe); ``"auto"`` the bar when stderr is a terminal, else
    the lines; ``False`` nothing. ``update(step, metrics, logged=True)`` reads the keys ``reward``,
    ``loss``, ``kl``, ``step_s``, ``tokens_per_s`` and ``peak_mem_gib`` when present; a line is
    written only for a logged step. ``note(text)`` writes one line (above the bar while it runs).
    ``mode`` is "bar", "lines" or "off"."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool | str = "auto",
                 description: str = "grpo"):
        if not any(enabled is m or (isinstance(m, str) and enabled == m) for m in PROGRESS_MODES):
            raise ConfigError(f"progress must be true, false, 'auto' or 'lines' (got {enabled!r})")
        self.total = total_steps
        self.start = start_step
        if enabled == "auto":
            enabled = True if sys.stderr.isatty() else "lines"
        self.mode = "lines" if enabled == "lines" else ("bar" if enabled else "off")
        self.enabled = self.mode == "bar"
        self.description = description
        self._progress = None
        self._task = None

    def __enter__(self) -> "ProgressBar":
        if self.mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, completed=self.start, stats="")
        return self

    @staticmethod
    def format_stats(metrics: Mapping[str, Any]) -> str:
        parts = []
        for key, label, fmt in (("reward", "reward", "{:.3f}"), ("kl", "kl", "{:.4f}"),
                                ("tokens_per_s", "tok/s", "{:,.0f}"), ("peak_mem_gib", "peak", "{:.2f} GiB")):
            v = _plain(metrics.get(key)) if key in metrics else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{label} " + fmt.format(v))
        return "  ".join(parts)

    @staticmethod
    def format_line(step: int, total: int, metrics: Mapping[str, Any], description: str = "grpo") -> str:
        """``grpo: step 3/14  reward 0.1234  loss -0.001234  0.12 s  1,234 tok/s`` (missing keys left out)."""
        parts = [f"{description}: step {step}/{total}"]
        for key, fmt in (("reward", "reward {:.4f}"), ("loss", "loss {:.6g}"), ("step_s", "{:.2f} s"),
                         ("tokens_per_s", "{:,.0f} tok/s")):
            v = _plain(metrics.get(key)) if key in metrics else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(fmt.format(v))
        return "  ".join(parts)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None, logged: bool = True) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=self.format_stats(metrics or {}))
        elif self.mode == "lines" and logged:
            self._write(self.format_line(step, self.total, metrics or {}, self.description))

    def note(self, text: str) -> None:
        """One line of text: above the live bar, or on stderr (flushed); nothing when off."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        elif self.mode != "off":
            self._write(text)

    @staticmethod
    def _write(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

"""Experiment trackers a run reports its per-step scalars to: ``run.report_to`` (TRL's name).

``run.report_to`` is a name or a list of names: ``tensorboard`` (``torch.utils.tensorboard``
event files under ``output_dir/tensorboard``), ``wandb`` (offline unless ``WANDB_MODE`` says
otherwise: files under ``output_dir/wandb``, ``wandb sync`` uploads them later), ``trackio``
(local-first: trackio's own directory, ``TRACKIO_DIR``), ``none`` (nothing; the default) or
``all`` (every one of the three that is installed). Each is an optional import:
:func:`check_report_to` (called by the config's validation) refuses a tracker whose package is
not installed with one line, before any work. The metrics file (``metrics.jsonl``) is always
written, whatever ``report_to`` says.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

from compilepass.core.errors import ConfigError

__all__ = ["TRACKERS", "Tracker", "check_report_to", "make_trackers", "package_installed"]

#: name -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def package_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_report_to(value: Any) -> list[str]:
    """The trackers ``value`` names (a name, a comma-separated string or a list), checked: each a
    known name with its package installed; ``none`` means none, ``all`` every installed one."""
    names = [value] if isinstance(value, str) else list(value or [])
    out: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip().lower()
            if name in ("", "none"):
                continue
            if name == "all":
                out += [n for n, pkg in TRACKERS.items() if package_installed(pkg) and n not in out]
                continue
            if name not in TRACKERS:
                raise ConfigError(f"'run.report_to' names an unknown tracker {name!r}; valid: "
                                  f"{', '.join(TRACKERS)}, none, all")
            if not package_installed(TRACKERS[name]):
                raise ConfigError(f"'run.report_to' names {name} but the {TRACKERS[name]} package is not installed "
                                  f"(pip install {TRACKERS[name]}, or leave {name} out of run.report_to)")
            if name not in out:
                out.append(name)
    return out


class Tracker(Protocol):
    name: str

    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars as TensorBoard events in ``output_dir/tensorboard``; on a resume from step S the
    events after S that a killed run left are purged (``purge_step``)."""
    name = "tensorboard"

    def __init__(self, output_dir: Path, resume_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for k, v in scalars.items():
            self._writer.add_scalar(k, v, global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """A wandb run, offline by default (``WANDB_MODE``, wandb's own variable, can say otherwise),
    its files under ``output_dir/wandb``."""
    name = "wandb"

    def __init__(self, output_dir: Path, resume_step: Optional[int], config: Optional[dict]):
        import wandb

        mode = None if os.environ.get("WANDB_MODE") else "offline"
        self._run = wandb.init(dir=str(output_dir), name=output_dir.name, config=config, mode=mode,
                               reinit="finish_previous")

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=int(step), commit=True)  # the step's row now, not at the next step

    def close(self) -> None:
        self._run.finish()


class TrackioTracker:
    """A trackio run in project ``compilepass`` named after ``output_dir``; a resumed run continues it."""
    name = "trackio"

    def __init__(self, output_dir: Path, resume_step: Optional[int], config: Optional[dict]):
        import trackio

        self._trackio = trackio
        self._run = trackio.init(project="compilepass", name=output_dir.name, config=config,
                                 resume="allow" if resume_step is not None else "never", embed=False)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=int(step))

    def close(self) -> None:
        self._run.finish()


def make_trackers(names: Sequence[str], output_dir: Path, resume_step: Optional[int] = None,
                  config: Optional[dict] = None) -> list[Tracker]:
    """One tracker per name (see :func:`check_report_to`); ``resume_step``: the step a resumed run
    continues after (None: a fresh run)."""
    made: list[Tracker] = []
    try:
        for name in check_report_to(list(names)):
            if name == "tensorboard":
                made.append(TensorBoardTracker(output_dir, resume_step))
            elif name == "wandb":
                made.append(WandbTracker(output_dir, resume_step, config))
            else:
                made.append(TrackioTracker(output_dir, resume_step, config))
    except BaseException:
        for t in made:
            t.close()
        raise
    return made

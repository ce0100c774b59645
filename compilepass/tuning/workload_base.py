"""What every workload is: a :class:`Workload` prepares its inputs once and makes one :class:`Runner`
per flag set; a runner's ``first_calls`` compile (and capture), its ``unit`` is one measured unit of
work returning the tokens it processed."""

from __future__ import annotations

import abc
from dataclasses import asdict
from typing import Any, Callable, Optional

from compilepass.core.workload_spec import WorkloadSpec


class HasWorkloadSpec:
    """JSON round trip for dataclasses whose ``workload`` field is a :class:`WorkloadSpec`
    (the payloads handed to isolated child processes)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["workload"] = self.workload.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        d["workload"] = WorkloadSpec.from_dict(d["workload"])
        return cls(**d)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """One compiled variant of a workload."""

    def __init__(self, step: Callable[[], Any], unit: Callable[[], int], device: str, n_first_calls: int = 3):
        self._step = step
        self._unit = unit
        self.device = device
        self.n_first_calls = n_first_calls

    def first_calls(self) -> None:
        for _ in range(self.n_first_calls):
            self._step()
        synchronize(self.device)

    def unit(self) -> int:
        tokens = self._unit()
        synchronize(self.device)
        return tokens


class Workload(abc.ABC):
    def __init__(self, spec: WorkloadSpec):
        self.spec = spec

    @abc.abstractmethod
    def prepare(self) -> None:
        """Build the model and inputs (not timed)."""

    @abc.abstractmethod
    def runner(self, options: Optional[dict]) -> Runner:
        """A compiled variant of this workload with the given Inductor options."""

    def describe(self) -> dict:
        return {}

"""One honest measurement: one flag set on one workload, in its own process.

Each trial runs in a child process of its own (:mod:`compilepass.tuning.isolation`: a new session,
fresh Inductor and Triton cache directories, a hard timeout, and a process group that dies with the
tuner). The child checks Inductor's cache counters to prove the compile missed the cache, times the
cold compile (trace, compile, autotune, first calls, CUDA-graph capture) and then many repeats of
the workload.
A crash, an out-of-memory or a timeout is a :class:`TrialResult` with the tail of its error output,
never an exception in the caller.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from compilepass.core.atomic import write_json_atomic
from compilepass.core.workload_spec import WorkloadSpec
from compilepass.tuning.isolation import IsolatedRun, run_isolated
from compilepass.tuning.stats import summarize
from compilepass.tuning.workload_base import HasWorkloadSpec, synchronize
from compilepass.tuning.workloads import make_workload

_TAIL_CHARS = 4000


@dataclass
class TrialSpec(HasWorkloadSpec):
    workload: WorkloadSpec
    flags: dict = field(default_factory=dict)
    repeats: int = 10
    warmup_units: int = 1
    timeout_s: float = 600.0
    extra_env: dict = field(default_factory=dict)


@dataclass
class TrialResult:
    status: str  # "ok", "failed", "oom", "timeout" or "cache_hit"
    flags: dict
    compile_s: Optional[float] = None
    throughput: Optional[float] = None  # tokens per second, median over repeats
    throughput_repeats: list = field(default_factory=list)
    unit_seconds: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    wall_s: float = 0.0
    error_tail: str = ""
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrialResult":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def failure_status(run: IsolatedRun) -> str:
    if run.status == "timeout":
        return "timeout"
    return "oom" if _looks_like_oom(run.tail) else "failed"


def run_trial(spec: TrialSpec, keep_dir: Optional[str] = None, lifeline: Optional[str] = None) -> TrialResult:
    """Run one trial in a fresh subprocess and return what happened, whatever happened."""
    run = run_isolated("compilepass.tuning.trial", spec.to_dict(), spec.timeout_s, spec.extra_env, keep_dir,
                       lifeline=lifeline)
    if run.payload is not None:
        result = TrialResult.from_dict(run.payload)
        if not result.ok and not result.error_tail:
            result.error_tail = run.tail
    elif run.status == "timeout":
        result = TrialResult("timeout", spec.flags, error_tail=f"killed after {spec.timeout_s:.0f} s\n" + run.tail)
    else:
        result = TrialResult(failure_status(run), spec.flags, error_tail=f"exit code {run.returncode}\n" + run.tail)
    result.wall_s = run.wall_s
    return result


def _looks_like_oom(text: str) -> bool:
    return "OutOfMemoryError" in text or "out of memory" in text.lower()


# ----------------------------------------------------------------------------- the child process


def inductor_cache_counters() -> dict:
    from torch._dynamo.utils import counters

    c = counters["inductor"]
    return {
        "fxgraph_cache_miss": int(c.get("fxgraph_cache_miss", 0)),
        "fxgraph_cache_hit": int(c.get("fxgraph_cache_hit", 0)),
        "fxgraph_cache_bypass": int(c.get("fxgraph_cache_bypass", 0)),
    }


def cache_was_cold(cache: dict) -> bool:
    """A compile that missed the cache: at least one graph compiled fresh and none came from the cache."""
    return cache.get("fxgraph_cache_hit", 0) == 0 and (
        cache.get("fxgraph_cache_miss", 0) + cache.get("fxgraph_cache_bypass", 0)) > 0


def measure(spec: TrialSpec) -> TrialResult:
    """Build, compile and time the workload in this process (called in the child)."""
    import torch


    workload = make_workload(spec.workload)
    workload.prepare()
    device = spec.workload.resolved_device()
    synchronize(device)
    before = inductor_cache_counters()
    t0 = time.perf_counter()
    runner = workload.runner(spec.flags)
    runner.first_calls()
    compile_s = time.perf_counter() - t0
    after = inductor_cache_counters()
    cache = {k: after[k] - before[k] for k in after}
    cache["inductor_cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    if not cache_was_cold(cache):
        return TrialResult("cache_hit", spec.flags, compile_s=compile_s, cache=cache,
                           error_tail="the compile did not miss Inductor's cache; measurement refused")
    for _ in range(spec.warmup_units):
        runner.unit()
    seconds, tps = [], []
    for _ in range(spec.repeats):
        t = time.perf_counter()
        tokens = runner.unit()
        dt = time.perf_counter() - t
        seconds.append(dt)
        tps.append(tokens / dt)

    summary = summarize(tps)
    details = {"throughput_summary": summary.to_dict(), "workload": workload.describe(), "device": device}
    if device.startswith("cuda"):
        details["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    return TrialResult("ok", spec.flags, compile_s=compile_s, throughput=summary.median,
                       throughput_repeats=tps, unit_seconds=seconds, cache=cache, details=details)


def _child_main(spec_path: str, result_path: str) -> int:
    import traceback

    spec = TrialSpec.from_dict(json.loads(Path(spec_path).read_text()))
    try:
        result = measure(spec)
    except BaseException as exc:  # recorded, then reported by the parent
        text = traceback.format_exc()
        status = "oom" if _looks_like_oom(text) or type(exc).__name__ == "OutOfMemoryError" else "failed"
        result = TrialResult(status, spec.flags, error_tail=text[-_TAIL_CHARS:])
    write_json_atomic(result_path, result.to_dict())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))

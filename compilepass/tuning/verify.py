"""Side-by-side verification: candidates against torch's defaults in one process, interleaved.

Every variant is compiled in the same process over the same model and inputs, the defaults first;
each variant's compile time there (``compile_s_in_process``) is what the balanced policy judges.
Then for each round each variant runs one unit of work, in an order that rotates every round
(A B C, B C A, ...). The ratio of a candidate's throughput to the defaults' in the same round is one
paired sample; the geometric mean over rounds with a 95% t-interval is the reported ratio. A
candidate wins only if its whole interval lies above 1.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from compilepass.core.atomic import write_json_atomic
from compilepass.core.workload_spec import WorkloadSpec
from compilepass.tuning.isolation import run_isolated
from compilepass.tuning.stats import RatioCI, paired_ratio_ci
from compilepass.tuning.trial import failure_status
from compilepass.tuning.workload_base import HasWorkloadSpec
from compilepass.tuning.workloads import make_workload


@dataclass
class VerifySpec(HasWorkloadSpec):
    workload: WorkloadSpec
    defaults: dict
    candidates: list  # list of flag dicts
    rounds: int = 12
    warmup_units: int = 1
    timeout_s: float = 1800.0


@dataclass
class CandidateVerdict:
    flags: dict
    ratio: Optional[dict]  # RatioCI as dict
    throughput: list  # per round, tokens/s
    compile_s_in_process: Optional[float]
    status: str = "ok"
    error_tail: str = ""

    @property
    def ci(self) -> Optional[RatioCI]:
        return RatioCI(**self.ratio) if self.ratio else None


@dataclass
class VerifyResult:
    status: str
    defaults_throughput: list = field(default_factory=list)
    defaults_compile_s_in_process: Optional[float] = None
    candidates: list = field(default_factory=list)  # CandidateVerdict dicts
    order: list = field(default_factory=list)
    wall_s: float = 0.0
    error_tail: str = ""
    engine_options: Optional[dict] = None  # the native engine's, for rollout workloads

    def verdicts(self) -> list[CandidateVerdict]:
        return [CandidateVerdict(**c) for c in self.candidates]

    def to_dict(self) -> dict:
        return asdict(self)


def verify(spec: VerifySpec) -> VerifyResult:
    """Run the side-by-side measurement in a fresh process (fresh caches, hard timeout)."""
    run = run_isolated("compilepass.tuning.verify", spec.to_dict(), spec.timeout_s)
    if run.payload is not None:
        result = VerifyResult(**run.payload)
        if result.status != "ok" and not result.error_tail:
            result.error_tail = run.tail
    else:
        result = VerifyResult(failure_status(run), error_tail=run.tail)
    result.wall_s = run.wall_s
    return result


def measure_side_by_side(spec: VerifySpec) -> VerifyResult:
    """The child's work: compile every variant here, then interleave their units."""
    workload = make_workload(spec.workload)
    workload.prepare()
    variants = [spec.defaults] + list(spec.candidates)
    runners, compile_s, errors = [], [], []
    for flags in variants:
        try:
            t0 = time.perf_counter()
            r = workload.runner(flags)
            r.first_calls()
            compile_s.append(time.perf_counter() - t0)
            runners.append(r)
            errors.append("")
        except Exception as exc:  # a candidate that fails here is reported, the others still run
            if not runners:
                raise  # the defaults themselves failed: nothing to compare against
            runners.append(None)
            compile_s.append(None)
            errors.append(f"{type(exc).__name__}: {exc}"[-2000:])
    live = [i for i, r in enumerate(runners) if r is not None]
    for i in live:
        for _ in range(spec.warmup_units):
            runners[i].unit()
    samples: dict[int, list[float]] = {i: [] for i in live}
    order_log = []
    for rnd in range(spec.rounds):
        order = live[rnd % len(live):] + live[:rnd % len(live)]
        order_log.append(order)
        for i in order:
            t = time.perf_counter()
            tokens = runners[i].unit()
            samples[i].append(tokens / (time.perf_counter() - t))
    base = samples[0]
    verdicts = []
    for i in range(1, len(variants)):
        if runners[i] is None:
            verdicts.append(CandidateVerdict(variants[i], None, [], None, "failed", errors[i]))
            continue
        ci = paired_ratio_ci(samples[i], base)
        verdicts.append(CandidateVerdict(variants[i], ci.to_dict(), samples[i], compile_s[i]))
    return VerifyResult("ok", base, compile_s[0], [asdict(v) for v in verdicts], order_log,
                        engine_options=workload.describe().get("engine_options"))


def _child_main(spec_path: str, result_path: str) -> int:
    import traceback

    spec = VerifySpec.from_dict(json.loads(Path(spec_path).read_text()))
    try:
        result = measure_side_by_side(spec)
    except BaseException:
        text = traceback.format_exc()
        result = VerifyResult("oom" if "out of memory" in text.lower() else "failed", error_tail=text[-4000:])
    write_json_atomic(result_path, result.to_dict())
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))

"""Small statistics for timings: summaries of repeats and paired ratio confidence intervals."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    mean: float
    min: float
    max: float
    iqr: float
    rel_spread: float  # iqr / median

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("no values to summarize")
    n = len(vals)
    med = statistics.median(vals)
    if n >= 4:
        q = statistics.quantiles(vals, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = vals[-1] - vals[0]
    return Summary(n, med, statistics.fmean(vals), vals[0], vals[-1], iqr, iqr / med if med else float("inf"))


# Two-sided 97.5% quantiles of Student's t for small degrees of freedom; 1.96 beyond.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    if df <= 0:
        return float("inf")
    if df in _T975:
        return _T975[df]
    keys = sorted(_T975)
    for lo, hi in zip(keys, keys[1:]):
        if lo < df < hi:
            return _T975[lo]  # conservative: the quantile at the smaller listed df is the larger one
    return 1.96


@dataclass(frozen=True)
class RatioCI:
    """Geometric-mean ratio candidate/baseline of paired measurements, with a 95% CI."""

    ratio: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def beats(self, margin: float = 1.0) -> bool:
        """True when the whole interval lies above ``margin`` (the advantage is not noise)."""
        return self.low > margin


def paired_ratio_ci(candidate: Sequence[float], baseline: Sequence[float]) -> RatioCI:
    """CI of the throughput ratio from pairs measured back to back (A B A B ...).

    Works on log ratios, so the interval is symmetric in log space and the point estimate is the
    geometric mean of the per-pair ratios. Pairs absorb slow drifts (clock, thermals) that affect
    both members of a pair alike.
    """
    if len(candidate) != len(baseline):
        raise ValueError("paired samples must have equal length")
    logs = [math.log(c / b) for c, b in zip(candidate, baseline) if c > 0 and b > 0]
    n = len(logs)
    if n < 2:
        raise ValueError("need at least two valid pairs for a confidence interval")
    mean = statistics.fmean(logs)
    sd = statistics.stdev(logs)
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return RatioCI(math.exp(mean), math.exp(mean - half), math.exp(mean + half), n)

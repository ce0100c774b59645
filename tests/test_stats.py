import random

import pytest

from compilepass.tuning.search import decide
from compilepass.tuning.stats import paired_ratio_ci, summarize
from compilepass.tuning.verify import CandidateVerdict, VerifyResult


def test_summary():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.median == 3.0 and s.min == 1.0 and s.max == 100.0 and s.n == 5
    with pytest.raises(ValueError):
        summarize([])


def test_ratio_ci_finds_a_real_gain_and_refuses_noise():
    rng = random.Random(0)
    base = [1000 * rng.uniform(0.8, 1.2) for _ in range(12)]
    faster = [b * 1.3 * rng.uniform(0.97, 1.03) for b in base]
    ci = paired_ratio_ci(faster, base)
    assert 1.25 < ci.ratio < 1.35 and ci.beats(1.0)
    # Same distribution, independent noise of +-20% per sample: no confident winner.
    noise = [1000 * rng.uniform(0.8, 1.2) for _ in range(12)]
    ci = paired_ratio_ci(noise, base)
    assert ci.low < 1.0 < ci.high and not ci.beats(1.0)


def test_ratio_ci_needs_pairs():
    with pytest.raises(ValueError):
        paired_ratio_ci([1.0], [1.0])
    with pytest.raises(ValueError):
        paired_ratio_ci([1.0, 2.0], [1.0])


def _verify_result(samples_by_candidate, base):
    cands = []
    for flags, samples in samples_by_candidate:
        ci = paired_ratio_ci(samples, base)
        cands.append(CandidateVerdict(flags, ci.to_dict(), samples, 1.0).__dict__)
    return VerifyResult("ok", base, 1.0, cands)


def test_decide_refuses_a_winner_whose_advantage_is_noise():
    # The candidate looked 15% faster in its own trial, but side by side it is noise.
    rng = random.Random(1)
    base = [1000 * rng.uniform(0.85, 1.15) for _ in range(10)]
    noisy = [1000 * rng.uniform(0.85, 1.20) for _ in range(10)]
    picks = [{"flags": {"combo_kernels": True}, "throughput": 1150.0, "compile_s": 10.0, "compile_ratio": 1.0}]
    winner, decision, rows = decide(picks, _verify_result([({"combo_kernels": True}, noisy)], base))
    assert winner is None and decision.startswith("keep defaults")
    assert rows[0]["beats_defaults"] is False


def test_decide_picks_the_best_confident_candidate():
    rng = random.Random(2)
    base = [1000 * rng.uniform(0.95, 1.05) for _ in range(10)]
    a = [b * 1.10 for b in base]
    b = [x * 1.25 * rng.uniform(0.99, 1.01) for x in base]
    picks = [{"flags": {"a": True}, "throughput": 1, "compile_s": 1, "compile_ratio": 1.0},
             {"flags": {"b": True}, "throughput": 1, "compile_s": 1, "compile_ratio": 1.1}]
    winner, decision, _ = decide(picks, _verify_result([({"a": True}, a), ({"b": True}, b)], base))
    assert winner == {"b": True} and decision.startswith("winner")


def test_decide_when_verification_failed():
    winner, decision, _ = decide([{"flags": {"a": True}}], VerifyResult("failed", error_tail="boom\nRuntimeError: x"))
    assert winner is None and "did not complete" in decision and "RuntimeError: x" in decision

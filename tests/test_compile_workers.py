"""start_compile_workers: Inductor's compile subprocesses started early only where a Triton compile follows."""

from __future__ import annotations

import pytest
import torch
from torch._inductor import async_compile

from compilepass.standby.rollout.compile import start_compile_workers


@pytest.fixture
def warm_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: calls.append(1))
    return calls


def test_nothing_starts_without_a_cuda_compile(warm_calls):
    assert start_compile_workers("cpu", "auto") is False
    assert start_compile_workers(torch.device("cpu"), {}) is False
    assert start_compile_workers("cuda", False) is False  # eager
    assert start_compile_workers("cuda", None) is False
    assert start_compile_workers("cuda", "auto", backend="eager") is False
    if not torch.cuda.is_available():
        assert start_compile_workers("cuda", "auto") is False  # no GPU here
        assert warm_calls == []


def test_a_cuda_compile_starts_the_pool_unless_compiles_run_in_process(monkeypatch, warm_calls):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(async_compile, "get_compile_threads", lambda: 8)
    assert start_compile_workers("cuda", "auto") is True
    assert start_compile_workers("cuda:0", {"max_autotune": True}) is True
    assert start_compile_workers("cpu", "auto") is False  # a GPU here, but the compile is the CPU's
    assert warm_calls == [1, 1]
    monkeypatch.setattr(async_compile, "get_compile_threads", lambda: 1)  # TORCHINDUCTOR_COMPILE_THREADS=1
    assert start_compile_workers("cuda", "auto") is False
    assert warm_calls == [1, 1]


def test_the_engine_records_whether_it_started_them():
    from model_helpers import make_model

    from compilepass.standby.rollout.engine import RolloutEngine

    engine = RolloutEngine(make_model("tiny"), max_batch=2, max_len=16, compile_options=False)
    assert engine.compile_workers is False

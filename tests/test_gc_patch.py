"""The gc capture patch: suppression, restoration, nesting, freeze balance, detection, vLLM hook."""

from __future__ import annotations

import dis
import gc
import importlib.machinery
import logging
import os
import subprocess
import sys
import types

import pytest

from compilepass import gc_patch
from compilepass.gc_patch import (
    capture_collects_per_graph,
    patch_vllm_capture,
    suppress_gc_during_capture,
    unpatch_vllm_capture,
)

REAL_COLLECT = gc.collect


@pytest.fixture(autouse=True)
def _clean_state():
    assert gc.collect is REAL_COLLECT
    # Start from nothing frozen: earlier code in this process (seen on the GPU machine, after CUDA
    # graph captures in other test files) can leave objects in the permanent generation.
    if gc.get_freeze_count():
        gc.unfreeze()
    freeze_before = gc.get_freeze_count()
    yield
    assert gc.collect is REAL_COLLECT, "gc.collect was left patched"
    assert gc_patch._depth == 0
    assert gc.get_freeze_count() == freeze_before
    unpatch_vllm_capture()


class CollectionCounter:
    """Counts collections by generation through gc.callbacks."""

    def __init__(self):
        self.starts = []

    def __call__(self, phase, info):
        if phase == "start":
            self.starts.append(info["generation"])

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)

    def full(self):
        return self.starts.count(2)


def _garbage_cycle():
    a = []
    a.append(a)
    return None


def test_collect_is_suppressed_inside_and_restored_after():
    with suppress_gc_during_capture(force=True) as stats:
        assert stats.active
        assert gc.collect is gc_patch._suppressed_collect
        with CollectionCounter() as counter:
            _garbage_cycle()
            assert gc.collect() == 0
            assert gc.collect(2) == 0
            assert gc.collect(generation=2) == 0
        assert counter.full() == 0
        assert stats.suppressed_full_collects == 3
    assert gc.collect is REAL_COLLECT
    with CollectionCounter() as counter:
        gc.collect()
    assert counter.full() == 1


def test_young_generations_still_collect():
    with suppress_gc_during_capture(force=True) as stats:
        with CollectionCounter() as counter:
            gc.collect(0)
            gc.collect(1)
        assert counter.starts == [0, 1]
        assert stats.young_collects_run == 2
        with pytest.raises(ValueError):
            gc.collect(7)  # a bad generation is still gc's error


def test_gc_stats_do_not_count_a_full_collection():
    with suppress_gc_during_capture(force=True):
        before = gc.get_stats()[2]["collections"]
        for _ in range(5):
            gc.collect()
        assert gc.get_stats()[2]["collections"] == before


def test_restored_after_an_exception():
    before = gc.get_freeze_count()
    with pytest.raises(RuntimeError, match="boom"):
        with suppress_gc_during_capture(force=True):
            assert gc.collect is not REAL_COLLECT
            raise RuntimeError("boom")
    assert gc.collect is REAL_COLLECT
    assert gc.get_freeze_count() == before
    assert gc_patch._depth == 0 and gc_patch._active is None


def test_nested_use():
    with suppress_gc_during_capture(force=True) as outer:
        with suppress_gc_during_capture() as inner:  # nested: no detection, same stats
            assert inner is outer and outer.depth == 2
            gc.collect()
            with pytest.raises(KeyError):
                with suppress_gc_during_capture(force=True):
                    raise KeyError("inner failure")
            assert gc.collect is gc_patch._suppressed_collect
        assert gc.collect is gc_patch._suppressed_collect  # still inside the outer block
        gc.collect()
        assert gc_patch._depth == 1
    assert gc.collect is REAL_COLLECT
    assert outer.suppressed_full_collects == 2


def test_freeze_unfreeze_balance():
    before = gc.get_freeze_count()
    assert before == 0
    keep = [[i] for i in range(1000)]  # tracked objects that must end up frozen
    with suppress_gc_during_capture(force=True) as stats:
        assert stats.froze
        assert gc.get_freeze_count() >= len(keep)
    assert gc.get_freeze_count() == before
    del keep


def test_existing_freeze_is_left_alone(monkeypatch):
    """The patch neither freezes nor unfreezes when objects are frozen already. Checked on its calls,
    not by comparing freeze counts: a frozen object freed by another thread (pytest-xdist's) lowers
    the count, which once failed an exact comparison by 2 of 837,660."""
    calls = []
    real_freeze, real_unfreeze = gc.freeze, gc.unfreeze
    real_freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
        monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
        with suppress_gc_during_capture(force=True) as stats:
            assert not stats.froze and stats.notes
            gc.collect()
            assert stats.suppressed_full_collects == 1
        assert calls == []
        assert 0 < gc.get_freeze_count() <= frozen
    finally:
        monkeypatch.undo()
        real_unfreeze()


def test_one_young_collection_on_entry_by_default():
    with CollectionCounter() as counter:
        with suppress_gc_during_capture(force=True) as stats:
            for _ in range(3):
                gc.collect()
    assert counter.full() == 0 and counter.starts[:1] == [1]
    assert stats.suppressed_full_collects == 3 and stats.entry_collect_s >= 0


def test_one_full_collection_on_entry_when_asked():
    with CollectionCounter() as counter:
        with suppress_gc_during_capture(force=True, collect_first="full") as stats:
            for _ in range(3):
                gc.collect()
    assert counter.full() == 1 and stats.suppressed_full_collects == 3


def test_no_collection_on_entry_when_asked():
    for value in ("none", False):
        with CollectionCounter() as counter:
            with suppress_gc_during_capture(force=True, collect_first=value) as stats:
                gc.collect()
                assert stats.froze and stats.entry_collect_s == 0.0
        assert counter.full() == 0 and stats.suppressed_full_collects == 1


def test_bad_entry_collection_value():
    with pytest.raises(ValueError, match="collect_first"):
        with suppress_gc_during_capture(force=True, collect_first="sometimes"):
            pass
    assert gc.collect is not gc_patch._suppressed_collect


def test_detection_on_the_running_torch():
    import torch

    collects, reason = capture_collects_per_graph()
    assert isinstance(collects, bool) and str(torch.__version__) in reason
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if (major, minor) >= (2, 9):
        assert collects == bool(torch.compiler.config.force_cudagraph_gc)
        assert "TORCH_CUDAGRAPH_GC" in reason
    else:
        assert collects


def test_detection_sees_the_env_var_in_a_fresh_process():
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 9):
        pytest.skip("torch < 2.9 collects per capture regardless of TORCH_CUDAGRAPH_GC")
    code = "from compilepass.gc_patch import capture_collects_per_graph as c; print(c()[0])"
    env = dict(os.environ, TORCH_CUDAGRAPH_GC="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_inactive_without_per_capture_collect_logs_one_line(caplog):
    collects, _ = capture_collects_per_graph()
    if collects:
        pytest.skip("the running torch collects per capture here (TORCH_CUDAGRAPH_GC is on)")
    if "vllm" in sys.modules:
        pytest.skip("vLLM is loaded")
    gc_patch._logged_inactive.clear()
    with caplog.at_level(logging.INFO, logger="compilepass.gc_patch"):
        with suppress_gc_during_capture() as stats:
            assert not stats.active
            assert gc.collect is REAL_COLLECT
            assert gc.get_freeze_count() == 0
    lines = [r for r in caplog.records if r.name == "compilepass.gc_patch"]
    assert len(lines) == 1 and "not applied" in lines[0].getMessage()


def test_torch_cuda_graphs_call_site_is_covered():
    """torch.cuda.graphs calls gc.collect through the gc module, so it resolves to the stand-in."""
    import torch.cuda.graphs as graphs

    enter = graphs.graph.__enter__
    instructions = list(dis.get_instructions(enter))
    sites = [
        (a.argval, b.argval)
        for a, b in zip(instructions, instructions[1:])
        if a.opname == "LOAD_GLOBAL" and a.argval == "gc"
    ]
    assert sites == [("gc", "collect")], "torch.cuda.graph.__enter__ no longer calls gc.collect via the module"
    # the global name 'gc' in torch.cuda.graphs is the gc module, looked up at call time
    assert enter.__globals__["gc"] is gc
    with suppress_gc_during_capture(force=True) as stats:
        resolved = enter.__globals__["gc"].collect
        assert resolved is gc_patch._suppressed_collect
        with CollectionCounter() as counter:
            resolved()
        assert counter.full() == 0 and stats.suppressed_full_collects == 1
    assert enter.__globals__["gc"].collect is REAL_COLLECT


def test_patch_vllm_without_vllm(caplog):
    if gc_patch._vllm_available():
        pytest.skip("vLLM is installed here")
    with caplog.at_level(logging.INFO, logger="compilepass.gc_patch"):
        assert patch_vllm_capture() is False
    assert any("vLLM is not installed" in r.getMessage() for r in caplog.records)


def _fake_vllm(monkeypatch, with_runner=True):
    """A stand-in vLLM package with the V1 runner module, registered in sys.modules."""
    seen = {}

    def make(name):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        mod.__path__ = []
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    vllm = make("vllm")
    vllm.__version__ = "0.0-test"
    make("vllm.v1")
    make("vllm.v1.worker")
    runner_mod = make("vllm.v1.worker.gpu_model_runner")
    if with_runner:

        class GPUModelRunner:
            def capture_model(self, sizes=(1, 2)):
                """Captures graphs."""
                seen["collect_is_patched"] = gc.collect is gc_patch._suppressed_collect
                gc.collect()  # what vLLM's own freeze_gc does first
                seen["freeze_count"] = gc.get_freeze_count()
                return 1234

        runner_mod.GPUModelRunner = GPUModelRunner
    return runner_mod, seen


def test_patch_vllm_capture_wraps_the_runner(monkeypatch):
    runner_mod, seen = _fake_vllm(monkeypatch)
    original = runner_mod.GPUModelRunner.capture_model
    assert patch_vllm_capture() is True
    patched = runner_mod.GPUModelRunner.capture_model
    assert patched is not original and patched.__name__ == "capture_model" and patched.__doc__ == original.__doc__
    assert patch_vllm_capture() is True  # idempotent: not wrapped twice
    assert runner_mod.GPUModelRunner.capture_model is patched
    with CollectionCounter() as counter:
        assert runner_mod.GPUModelRunner().capture_model(sizes=(4,)) == 1234
    assert seen["collect_is_patched"] and seen["freeze_count"] > 0
    # vLLM's own gc.collect() inside was suppressed (automatic collections may still run: after
    # the freeze they scan only the few unfrozen objects)
    assert 1 in counter.starts  # the patch's young collection on entry
    assert gc.collect is REAL_COLLECT
    assert unpatch_vllm_capture() == 1
    assert runner_mod.GPUModelRunner.capture_model is original


def test_patch_vllm_capture_unknown_layout_warns(monkeypatch, caplog):
    _fake_vllm(monkeypatch, with_runner=False)
    with caplog.at_level(logging.WARNING, logger="compilepass.gc_patch"):
        assert patch_vllm_capture() is False
    assert any("none of its known capture methods" in r.getMessage() for r in caplog.records)


def test_vllm_loaded_activates_without_force(monkeypatch):
    collects, _ = capture_collects_per_graph()
    _fake_vllm(monkeypatch)
    with suppress_gc_during_capture() as stats:
        assert stats.active
        assert ("vLLM is loaded" in stats.reason) or collects

"""vllm_build_scope: what an in-process vLLM build changes (vLLM 0.26 reseeds random / NumPy / torch,
freezes the gc heap, sets Triton's JIT monitor knobs) is put back after it. The build is stood in for
by a function doing those same things; the scope, the thing under test, is real."""

from __future__ import annotations

import gc
import random

import numpy as np
import pytest
import torch

from compilepass.standby.rollout.vllm.process_state import cumem_bytes_in_use, gc_freezes_undone, vllm_build_scope


def _what_vllm_does():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    gc.freeze()


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_random_streams_and_the_gc_heap_are_put_back():
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    want = _draws()
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    assert gc.get_freeze_count() == 0
    with vllm_build_scope():
        _what_vllm_does()
    assert gc.get_freeze_count() == 0, "the heap vLLM froze was not unfrozen"
    assert _draws() == want  # the trainer's streams continue as if no engine had been built


def test_a_heap_frozen_before_stays_frozen_and_errors_still_restore(monkeypatch):
    unfreezes = []
    real_unfreeze = gc.unfreeze
    gc.freeze()
    try:
        # the scope's calls are counted, not the frozen objects: another thread (xdist's) can free a frozen
        # object by refcount meanwhile (seen once: 956,994 -> 956,992 in a fresh clone's suite, session 11)
        monkeypatch.setattr(gc, "unfreeze", lambda: unfreezes.append(1) or real_unfreeze())
        with vllm_build_scope():
            gc.collect()
        monkeypatch.undo()
        assert unfreezes == [] and gc.get_freeze_count() > 0  # someone else's freeze is left alone
    finally:
        monkeypatch.undo()
        gc.unfreeze()
    state = torch.random.get_rng_state()
    with pytest.raises(RuntimeError, match="build failed"):
        with vllm_build_scope():
            torch.manual_seed(7)
            raise RuntimeError("build failed")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_triton_jit_monitor_knobs_are_restored():
    triton = pytest.importorskip("triton")
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.autotuning, "print"):
        pytest.skip("this Triton has no knobs.autotuning.print")
    before = knobs.autotuning.print
    with vllm_build_scope():
        knobs.autotuning.print = not before
    assert knobs.autotuning.print == before


def test_cumem_in_use_is_zero_without_a_cuda_vllm():
    assert cumem_bytes_in_use() == 0


def test_every_freeze_is_recorded_by_its_caller_and_undone():
    """What the H200 showed (vLLM 0.26): the heap frozen after the engine's calls. Each call into vLLM
    runs in gc_freezes_undone: where gc.freeze() was called from is counted, and the freeze undone."""
    sites = {}
    assert gc.get_freeze_count() == 0
    with gc_freezes_undone(sites):
        _what_vllm_does()
        gc.freeze()
    assert gc.get_freeze_count() == 0
    assert gc.freeze.__module__ == "gc"  # the recorder is gone
    assert sum(sites.values()) == 2 and all(s.startswith(__file__) for s in sites), sites
    with vllm_build_scope(sites):  # the build scope records into the same dict
        gc.freeze()
    assert gc.get_freeze_count() == 0 and sum(sites.values()) == 3


def test_nested_freeze_recorders_restore_in_order_and_an_earlier_freeze_stays():
    outer, inner = {}, {}
    real = gc.freeze
    with gc_freezes_undone(outer):
        with gc_freezes_undone(inner):
            gc.freeze()
        assert gc.get_freeze_count() == 0  # the inner scope saw an unfrozen heap on entry
        gc.freeze()
    assert gc.freeze is real and sum(inner.values()) == 1 and sum(outer.values()) == 2  # outer sees both
    assert all(site.startswith(__file__) for site in (*inner, *outer)), (inner, outer)
    gc.freeze()
    try:
        with gc_freezes_undone():
            pass
        assert gc.get_freeze_count() > 0  # someone else's freeze is left alone
    finally:
        gc.unfreeze()


def test_a_freeze_inside_is_undone_even_over_an_earlier_freeze():
    """Session 13 on the H200: 375 objects were frozen before the build, then vLLM froze the whole heap
    (EngineCore.__init__, the GPU worker's warm-up). Leaving that because of the earlier freeze kept
    the trainer's whole heap out of cycle collection."""
    gc.freeze()
    try:
        sites = {}
        with gc_freezes_undone(sites):
            gc.freeze()
        assert sum(sites.values()) == 1
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_the_float32_matmul_precision_vllm_sets_is_restored():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with vllm_build_scope():
            torch.set_float32_matmul_precision("highest")  # vLLM's GPU worker, VLLM_FLOAT32_MATMUL_PRECISION
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)

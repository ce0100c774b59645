"""Persistent compiles (torch's AOT precompile): a compiled function saved by one process (or object) and
loaded by the next instead of traced again; stale or foreign files are compiled again, never used."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from compilepass.standby.rollout import persistent_compile as pc
from compilepass.standby.rollout.compile import resolve_persist_dir

needs_aot = pytest.mark.skipif(not pc.supported(), reason=f"torch {torch.__version__} has no AOT precompile API")


def scaled_add(w, x, y):
    return torch.relu(x @ w) + y * 2


def make(directory, key=None):
    return pc.PersistentCompile(scaled_add, key=key or {"test": 1}, directory=directory, dynamic_args=(1, 2),
                                dynamic_batch=True, max_batch=8)


def inputs(batch, dtype=torch.float32):
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(6, 5, generator=g, dtype=dtype), torch.randn(batch, 6, generator=g, dtype=dtype),
            torch.randn(batch, 5, generator=g, dtype=dtype))


@needs_aot
def test_saved_variants_load_in_a_new_object_and_match_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    first = make(tmp_path / "pc")
    for b in (4, 3, 1):
        torch.testing.assert_close(first(*inputs(b)), scaled_add(*inputs(b)))
    assert first.compiled == ["dyn", "b1"]  # batch 3 ran the symbolic-batch compile of batch 4
    assert sorted(p.name for p in (tmp_path / "pc").iterdir()) == sorted(
        [first.path("dyn").name, first.path("b1").name])
    second = make(tmp_path / "pc")
    for b in (5, 1, 8):
        torch.testing.assert_close(second(*inputs(b)), scaled_add(*inputs(b)))
    assert second.loaded == ["dyn", "b1"] and second.compiled == []
    other = make(tmp_path / "pc", key={"test": 2})  # another key: another file, compiled
    other(*inputs(4))
    assert other.compiled == ["dyn"] and other.path("dyn") != first.path("dyn")


@needs_aot
def test_a_corrupt_or_mismatched_file_is_compiled_again_and_replaced(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    make(tmp_path / "pc")(*inputs(4))
    path = make(tmp_path / "pc").path("dyn")
    path.write_bytes(b"not a compiled function")
    with caplog.at_level(logging.WARNING, logger=pc.__name__):
        again = make(tmp_path / "pc")
        torch.testing.assert_close(again(*inputs(4)), scaled_add(*inputs(4)))
    assert again.compiled == ["dyn"] and "not used" in caplog.text
    assert make(tmp_path / "pc")(*inputs(2)) is not None and path.read_bytes() != b"not a compiled function"
    caplog.clear()
    # float64 inputs fail the float32 file's guards: compiled for them, the file replaced
    with caplog.at_level(logging.WARNING, logger=pc.__name__):
        wide = make(tmp_path / "pc")
        torch.testing.assert_close(wide(*inputs(4, torch.float64)), scaled_add(*inputs(4, torch.float64)))
    assert wide.compiled == ["dyn"] and "guards fail" in caplog.text


@needs_aot
def test_a_call_failing_the_guards_after_the_first_compiles_the_ordinary_way(tmp_path, monkeypatch, caplog):
    """A precompiled function raises on a guard failure where torch.compile would compile again; a later
    call of the same variant with other guards (here float64, as LoRA on some layers only gives the
    others) takes the ordinary compile, and the precompiled one keeps serving its own inputs."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    f = make(tmp_path / "pc")
    torch.testing.assert_close(f(*inputs(4)), scaled_add(*inputs(4)))
    with caplog.at_level(logging.INFO, logger=pc.__name__):
        torch.testing.assert_close(f(*inputs(4, torch.float64)), scaled_add(*inputs(4, torch.float64)))
        torch.testing.assert_close(f(*inputs(3, torch.float64)), scaled_add(*inputs(3, torch.float64)))
    assert f.compiled == ["dyn"] and f.guard_misses == ["dyn"] and "guards fail on a call" in caplog.text
    batch = inputs(5)
    torch.testing.assert_close(f(*batch), scaled_add(*batch))
    assert not [a for t in batch for a in vars(t) if "dynamo" in a]  # no marks left on the caller's tensors
    assert not [p for p in (tmp_path / "pc").iterdir() if p.name.endswith(".tmp")]  # saved by rename


def test_the_key_holds_what_global_guards_check():
    """The thread count (torchrun's OMP_NUM_THREADS=1 vs one process) and the matmul precision are
    checked by the global-state guards: another value is another file, not a replaced one."""
    before = torch.get_num_threads()
    try:
        key = pc.environment_key(torch.device("cpu"))
        torch.set_num_threads(max(1, before - 1) if before > 1 else 2)
        assert pc.environment_key(torch.device("cpu"))["threads"] != key["threads"]
    finally:
        torch.set_num_threads(before)
    assert {"python", "fp32_matmul", "inductor_config", "torch"} <= set(key)


def test_the_layer_key_tells_lora_set_ups_apart():
    from peft import LoraConfig, get_peft_model

    from compilepass.core.models import build_model
    from compilepass.core.shapes import ModelShape
    from compilepass.standby.rollout.decode import Decoder, StaticKVCache

    keys = []
    for cfg in (None, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0]),
                LoraConfig(r=8, target_modules=["q_proj", "v_proj"])):
        model = build_model("tiny", dtype=torch.float32, seed=0)
        model = get_peft_model(model, cfg) if cfg is not None else model
        cache = StaticKVCache(ModelShape.from_hf_config(model.config), batch=2, max_len=8, dtype=torch.float32)
        keys.append(Decoder(model, cache).persist_key({}, True))
    assert len({k["adapters"] for k in keys}) == 4
    cache = StaticKVCache(ModelShape.from_hf_config(model.config), batch=2, max_len=16, dtype=torch.float32)
    assert Decoder(model, cache).persist_key({}, True)["max_len"] == 16 != keys[-1]["max_len"]


@needs_aot
def test_a_function_torch_cannot_precompile_is_compiled_as_usual(tmp_path, monkeypatch, caplog):
    """With Inductor's caches off, torch refuses to precompile: the plain compile runs, nothing is saved,
    the symbolic batch still serves every batch >= 2."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    with inductor_config.patch(force_disable_caches=True), caplog.at_level(logging.WARNING, logger=pc.__name__):
        f = make(tmp_path / "pc")
        for b in (4, 3, 1):
            torch.testing.assert_close(f(*inputs(b)), scaled_add(*inputs(b)))
    assert f.fallback and "AOT precompile failed" in caplog.text
    assert f.compiled == [] and not (tmp_path / "pc").exists()


def test_persist_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(tmp_path))
    assert resolve_persist_dir(False) is None
    assert resolve_persist_dir(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.setenv(pc.ENV_SWITCH, "0")
    assert resolve_persist_dir(None) is None
    monkeypatch.delenv(pc.ENV_SWITCH)
    assert resolve_persist_dir(None) == (tmp_path / "precompiled" if pc.supported() else None)


CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from torch._dynamo.utils import counters
    from compilepass.core.models import build_model
    from compilepass.standby.rollout.engine import RolloutEngine

    model = build_model("tiny", dtype=torch.float32, seed=0)
    prompts = torch.randint(0, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1)).tolist()
    t0 = time.perf_counter()
    engine = RolloutEngine(model, max_batch=4, max_len=24, compile_options={}, graph_sampling=True)
    start = time.perf_counter() - t0
    traced = counters["stats"]["unique_graphs"]
    out = engine.generate(prompts, max_new_tokens=6, temperature=0)
    sampled = engine.generate(prompts, max_new_tokens=6, temperature=0.8, seed=3)
    eager = RolloutEngine(model, max_batch=4, max_len=24, compile_options=False, graph_sampling=True)
    fns = [engine.decoder._layer_fn] + [f for f in engine._post_fns.values() if hasattr(f, "loaded")]
    print(json.dumps({"start_s": start, "traced": traced, "loaded": [f.loaded for f in fns],
                      "compiled": [f.compiled for f in fns], "tokens": out.completion_ids.tolist(),
                      "sampled": sampled.completion_ids.tolist(),
                      "eager": eager.generate(prompts, max_new_tokens=6, temperature=0).completion_ids.tolist(),
                      "eager_sampled": eager.generate(prompts, max_new_tokens=6, temperature=0.8,
                                                      seed=3).completion_ids.tolist()}))
""")


@needs_aot
@pytest.mark.slow
def test_a_second_engine_process_loads_every_compiled_function_and_traces_none(tmp_path):
    """The engine's compiled layer and its two in-graph samplers, saved by the first process, are loaded by
    the second: dynamo traces nothing there, and both give the eager engine's tokens."""
    env = dict(os.environ, COMPILEPASS_CACHE_DIR=str(tmp_path / "cp"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ind"))
    env.pop(pc.ENV_SWITCH, None)
    rows = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = rows
    assert first["compiled"] == [["dyn"]] * 3 and first["loaded"] == [[]] * 3 and first["traced"] == 3
    assert second["loaded"] == [["dyn"]] * 3 and second["compiled"] == [[]] * 3 and second["traced"] == 0
    for row in rows:
        assert row["tokens"] == row["eager"] and row["sampled"] == row["eager_sampled"]
    assert len(list((tmp_path / "cp" / "precompiled").iterdir())) == 3


@needs_aot
@pytest.mark.slow
def test_an_engine_with_lora_on_some_layers_only_generates_as_eager(tmp_path, monkeypatch):
    """One compiled layer serves every layer: with LoRA on layer 0 only, layer 1's call fails the
    precompiled layer's guards (its projections are plain Linear); it compiles the ordinary way."""
    from peft import LoraConfig, get_peft_model

    from compilepass.core.models import build_model
    from compilepass.standby.rollout.engine import RolloutEngine

    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(tmp_path / "cp"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "ind"))
    monkeypatch.delenv(pc.ENV_SWITCH, raising=False)
    model = get_peft_model(build_model("tiny", dtype=torch.float32, seed=0),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                                      init_lora_weights=False))
    prompts = [[5, 6, 7], [8, 9]]
    engine = RolloutEngine(model, max_batch=2, max_len=16, compile_options={}, persistent_compile=True)
    eager = RolloutEngine(model, max_batch=2, max_len=16, compile_options=False)
    out = engine.generate(prompts, max_new_tokens=5, temperature=0)
    assert out.completion_ids.tolist() == eager.generate(prompts, max_new_tokens=5, temperature=0).completion_ids.tolist()
    assert engine.decoder._layer_fn.guard_misses  # layer 1 took the ordinary compile

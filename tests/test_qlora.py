"""QLoRA (``model.load_in_4bit``) on CPU: bitsandbytes' CPU backend (0.50: NF4 quantize / dequantize,
``matmul_4bit`` forward and backward, the ``gemm_4bit`` inference op all run on CPU tensors).

The 4-bit model is compared with its dequantized twin (:func:`quant_helpers.dequantized_twin`: plain
float Linear layers holding ``dequantize_4bit`` of the very codes, built only here): greedy tokens
of the native engine and of transformers' generate, and the trainer's LoRA gradients. Without
bitsandbytes the tests that need it skip (the refusals are tested either way).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from compilepass import cli
from compilepass.core.errors import ConfigError
from compilepass.core.models import build_model
from compilepass.core.quantize import NF4_DQ, bitsandbytes_available, is_4bit_linear, quant_of
from compilepass.standby.grpo.config import default_config, load_config

needs_bnb = pytest.mark.skipif(not bitsandbytes_available(),
                               reason="bitsandbytes is not installed (pip install 'compilepass[qlora]')")

NEW = 10
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1], [7, 7]]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path / 'run'}", "model.load_in_4bit=true", *overrides],
                       base=default_config("tiny"))


def _hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _engine(model):
    from compilepass.standby.rollout.engine import RolloutEngine

    return RolloutEngine(model, max_batch=4, max_len=48, compile_options=False)


# ------------------------------------------------------------------------------ refusals (any install)


def test_without_bitsandbytes_one_line(monkeypatch, capsys, tmp_path):
    """``sys.modules[name] = None`` is how Python marks a module as not importable: find_spec says
    None and ``import`` fails, as on a machine without the package."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert not bitsandbytes_available()
    rc = cli.main(["grpo", "--preset", "tiny", "--no-progress", f"run.output_dir={tmp_path / 'x'}",
                   "model.load_in_4bit=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "'model.load_in_4bit'" in err[0] and "compilepass[qlora]" in err[0]
    with pytest.raises(ConfigError, match="model.load_in_4bit needs bitsandbytes"):
        build_model("tiny", dtype=torch.float32, load_in_4bit=True)


def test_4bit_with_the_vllm_engine_one_line(capsys, tmp_path):
    rc = cli.main(["grpo", "--preset", "tiny", "--no-progress", f"run.output_dir={tmp_path / 'x'}",
                   "model.load_in_4bit=true", "generation.engine=vllm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "'model.load_in_4bit' is not supported by the vLLM engine" in err[0] and "engine=native" in err[0]
    assert not (tmp_path / "x").exists()  # refused before any work


# ------------------------------------------------------------------------------ building the 4-bit base


@needs_bnb
def test_preset_quantization_is_transformers_bitsandbytes_loading(tmp_path):
    """A preset quantized after build holds the same codes and scales as the same weights loaded
    from a directory through transformers' BitsAndBytesConfig; lm_head stays float; nothing else
    float is left in the decoder's projections."""
    from model_helpers import make_model

    from compilepass.core.quantize import quantize_linears

    float_model = make_model("tiny-llama")
    float_model.save_pretrained(tmp_path / "m")
    ours = quantize_linears(make_model("tiny-llama"), torch.float32)
    theirs = build_model(tmp_path / "m", dtype=torch.float32, load_in_4bit=True)
    assert quant_of(ours) == quant_of(theirs) == NF4_DQ and getattr(theirs, "is_loaded_in_4bit", False)
    mods_a, mods_b = dict(ours.named_modules()), dict(theirs.named_modules())
    quantized = [n for n, m in mods_a.items() if is_4bit_linear(m)]
    assert len(quantized) == 2 * 7  # q k v o gate up down, 2 layers
    assert not any(type(m) is torch.nn.Linear for n, m in mods_a.items() if n != "lm_head")
    assert type(mods_a["lm_head"]) is torch.nn.Linear and type(mods_b["lm_head"]) is torch.nn.Linear
    for name in quantized:
        a, b = mods_a[name].weight, mods_b[name].weight
        assert is_4bit_linear(mods_b[name]) and a.dtype == torch.uint8 and a.shape == b.shape
        assert torch.equal(a.data, b.data), name
        sa, sb = a.quant_state, b.quant_state
        assert sa.nested and sb.nested and sa.quant_type == sb.quant_type == "nf4" and sa.blocksize == 64
        assert torch.equal(sa.absmax, sb.absmax) and torch.equal(sa.state2.absmax, sb.state2.absmax), name


@needs_bnb
def test_trainer_policy_is_a_frozen_4bit_base_under_peft_4bit_lora(tmp_path):
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from compilepass.standby.grpo.policy import build_policy

    c = _config(tmp_path).validate()
    policy = build_policy(c, torch.device("cpu"))
    q = policy.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, PeftLinear4bit) and is_4bit_linear(q.base_layer)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert quant_of(policy) == NF4_DQ


# ------------------------------------------------------------------------------ the engine on 4-bit weights


@needs_bnb
@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "tiny-qwen2"])  # qwen3 (q/k norms), llama, qwen2 (biases)
def test_engine_greedy_equals_the_dequantized_model(name):
    from quant_helpers import dequantized_twin, quantized_tiny

    model = quantized_tiny(name)
    twin = dequantized_twin(model)
    assert quant_of(twin) is None
    engine = _engine(model)
    assert engine.fused_projections is False and engine.decoder.quant4
    out = engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    ref = _engine(twin).generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    assert len(out.completion_ids.unique()) > NEW // 2, "degenerate model: the comparison would prove little"
    assert torch.equal(out.completion_ids, ref.completion_ids)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)
    for b, p in enumerate(PROMPTS):  # transformers' generate over the dequantized float layers
        assert out.completion_ids[b].tolist() == _hf_greedy(twin, p, NEW), b


@needs_bnb
def test_engine_reads_the_trainers_packed_weights_and_current_lora():
    """No copy: the codes the engine reads are the Params4bit tensors themselves (same storage
    before and after generating), every base projection is still 4-bit; an in-place LoRA update
    (what an optimizer step does) shows in the next generation, as on the dequantized twin."""
    from quant_helpers import dequantized_twin, quantized_tiny

    model = quantized_tiny("tiny")
    ptrs = {n: m.weight.data_ptr() for n, m in model.named_modules() if is_4bit_linear(m)}
    engine = _engine(model)
    before = engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0).completion_ids
    assert {n: m.weight.data_ptr() for n, m in model.named_modules() if is_4bit_linear(m)} == ptrs
    assert all(m.weight.dtype == torch.uint8 for n, m in model.named_modules() if is_4bit_linear(m))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(-3.0)
    after = engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0).completion_ids
    assert not torch.equal(before, after)
    assert torch.equal(after, _engine(dequantized_twin(model)).generate(PROMPTS, max_new_tokens=NEW,
                                                                          temperature=0).completion_ids)


@needs_bnb
def test_compiled_4bit_decode_step_matches_eager(request):
    """The decode layer with its bitsandbytes matmuls traces with fullgraph dynamo (its eager backend,
    as test_engine's compiled tests; Inductor and CUDA graphs are the GPU follow-up)."""
    import torch._dynamo
    from quant_helpers import quantized_tiny

    from compilepass.standby.rollout.engine import RolloutEngine

    torch._dynamo.reset()
    request.addfinalizer(torch._dynamo.reset)
    model = quantized_tiny("tiny")
    compiled = RolloutEngine(model, max_batch=4, max_len=48, compile_options={}, compile_backend="eager")
    a = compiled.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    b = _engine(model).generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    assert torch.equal(a.completion_ids, b.completion_ids)


# ------------------------------------------------------------------------------ training on 4-bit weights


@needs_bnb
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_lora_gradients_match_the_dequantized_reference(tmp_path, checkpointing):
    """The trainer's loss path (policy_logprobs -> micro_batch_loss, under lora_mixed_precision, with
    the trainer's gradient checkpointing) on the 4-bit policy and on its dequantized twin with the
    same LoRA: the LoRA gradients agree within rtol 1e-4 / atol 1e-6 (float32; bitsandbytes' backward
    multiplies by the same dequantized weights, so only summation order differs)."""
    from quant_helpers import dequantized_twin

    from compilepass.core.shapes import causal_lm_of
    from compilepass.standby.grpo.policy import apply_training_memory, build_policy
    from compilepass.standby.training.logprobs import policy_logprobs
    from compilepass.standby.training.loss import micro_batch_loss
    from compilepass.standby.training.train_memory import lora_mixed_precision

    c = _config(tmp_path, f"model.gradient_checkpointing={str(checkpointing).lower()}", "model.lora_rank=4").validate()
    policy = build_policy(c, torch.device("cpu"))
    with torch.no_grad():  # a non-zero B, so that A's gradient is not trivially zero
        gen = torch.Generator().manual_seed(5)
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    twin = dequantized_twin(policy)
    gen = torch.Generator().manual_seed(3)
    completions = torch.randint(0, 256, (4, 6), generator=gen)
    mask = torch.ones_like(completions)
    mask[1, 4:] = 0
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    grads = []
    for model in (policy, twin):
        apply_training_memory(causal_lm_of(model), c)
        model.train()
        with lora_mixed_precision(model):
            logp = policy_logprobs(model, PROMPTS + [[3, 1]], completions, mask)
            loss, _ = micro_batch_loss(logp, None, None, advantages, mask, mask.sum(), slice(0, 4),
                                       loss_type="grpo", beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                                       max_completion_length=6)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * 7
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


@needs_bnb
def test_grpo_two_steps_on_a_4bit_tiny_model(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["grpo", "--preset", "tiny", "--no-progress", f"run.output_dir={out}", "run.max_steps=2",
                   "data.prompts_per_step=2", "generation.num_generations=4", "model.load_in_4bit=true"])
    assert rc == 0, capsys.readouterr().err
    meta = Path(out / "latest").read_text().strip()
    assert (out / meta).is_dir() and (out / "adapter_model.safetensors").is_file()
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step" in r]
    assert steps and max(r["step"] for r in steps) == 2
    assert all(r["grad_norm"] > 0 for r in steps)  # the LoRA on the 4-bit base got gradients
    saved = json.loads((out / meta / "meta.json").read_text())
    assert saved["config"]["model"]["load_in_4bit"] is True


@needs_bnb
def test_model_objects_and_the_key(tmp_path):
    """A 4-bit object given in Python sets the key (checkpoints say what was trained); the key with
    a 16-bit object is one line (the object is never quantized in place)."""
    from model_helpers import make_model
    from quant_helpers import quantized_tiny

    from compilepass.standby.grpo.policy import adopt_model_arg, build_policy

    c = load_config(None, [f"run.output_dir={tmp_path / 'run'}"], base=default_config("tiny"))
    adopt_model_arg(c, quantized_tiny("tiny", lora=False))
    assert c.model.load_in_4bit is True
    c = _config(tmp_path).validate()
    with pytest.raises(ConfigError, match="'model.load_in_4bit' is true but the model object given has no 4-bit"):
        build_policy(c, torch.device("cpu"), model=make_model("tiny"))


def test_bench_context_with_a_4bit_base_fits_and_records_it():
    """``bench context --load-in-4bit``: the QLoRA base trains and generates on CPU (a smoke run),
    the result records it, and the vLLM engine with it is one line."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the qlora extra)")
    from compilepass.core.errors import CompilepassError
    from compilepass.standby.bench.context import max_context

    res = max_context("tiny", allow_cpu=True, min_len=4, max_len=4, lora_rank=4, load_in_4bit=True)
    assert res.load_in_4bit and res.max_completion_len == 4 and all(t.ok for t in res.trials), res.trials
    with pytest.raises(CompilepassError, match="--load-in-4bit generates with the native engine"):
        max_context("tiny", allow_cpu=True, load_in_4bit=True, engine="vllm")


# ------------------------------------------------------------------------------ the tuner and the database


@needs_bnb
@pytest.mark.parametrize("kind", ["rollout", "train"])
def test_tune_workloads_measure_the_4bit_model(kind):
    """``compilepass tune --load-in-4bit``: the workload's model is the NF4 base, frozen under the LoRA
    adapter for ``train`` (the engine's 4-bit decode and the 4-bit LoRA backward are tested above)."""
    from compilepass.core.workload_spec import WorkloadSpec
    from compilepass.tuning.workloads import RolloutWorkload, TrainWorkload

    spec = WorkloadSpec(kind=kind, model="tiny", batch=2, prompt_len=4, new_tokens=3, seq_len=8, lora_rank=4,
                        device="cpu", load_in_4bit=True)
    wl = (RolloutWorkload if kind == "rollout" else TrainWorkload)(spec)
    wl.prepare()
    assert quant_of(wl.model.get_base_model() if kind == "train" else wl.model) == NF4_DQ
    if kind == "train":
        trainable = {n for n, p in wl.model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)  # the 4-bit base stays frozen


def test_tune_4bit_is_keyed_named_and_refused_as_4bit(tmp_path, capsys, monkeypatch):
    """A 4-bit tune result records a ``quant`` key (never offered to the 16-bit model), its study has its
    own name (16-bit names unchanged), and the combinations it cannot measure are one line each."""
    import dataclasses

    from test_db import make_result

    from compilepass import db
    from compilepass.core.workload_spec import WorkloadSpec
    from compilepass.tuning.search import study_name_for

    r = make_result(winner={"max_autotune": True})
    r16 = db.entry_from_tune_result(r)
    r["workload"] = dict(r["workload"], load_in_4bit=True)
    r4 = db.entry_from_tune_result(r)
    assert r4["key"]["model"]["quant"] == NF4_DQ and "quant" not in r16["key"]["model"] and r4["id"] != r16["id"]
    old = dict(r["workload"])
    old.pop("load_in_4bit")  # a result written before the field existed reads as 16-bit
    assert WorkloadSpec.from_dict(old).quant() is None

    from compilepass.core.env import EnvironmentKey

    env = EnvironmentKey(**{f.name: None for f in dataclasses.fields(EnvironmentKey)})
    w16 = WorkloadSpec(model="qwen3-0.6b")
    n16, n4 = study_name_for(env, w16), study_name_for(env, dataclasses.replace(w16, load_in_4bit=True))
    assert n4 != n16 and n4.startswith("qwen3-0.6b-nf4-dq-rollout-") and n16.startswith("qwen3-0.6b-rollout-")
    w16.load_in_4bit = False
    assert study_name_for(env, w16) == n16

    for argv, match in ((["--engine", "vllm"], "--load-in-4bit measures the native engine"),
                        (["--workload", "mlp"], "--load-in-4bit needs a model workload")):
        rc = cli.main(["tune", "--model", "tiny", "--load-in-4bit", "--no-record", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and match in err[0], err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    rc = cli.main(["tune", "--model", "tiny", "--load-in-4bit", "--no-record", "--storage",
                   f"sqlite:///{tmp_path / 's.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs bitsandbytes" in err[0], err
    assert not (tmp_path / "s.db").exists()  # refused before any study

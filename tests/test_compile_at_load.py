"""Flags at model load, outside our engine (issue 19 item 8): ``compilepass.compile(model, workload=...)``
picks the entry measured for that workload and says which and why; any causal LM family gets an
answer (its family's entries or torch's defaults), never an error; ``vllm_compilation_config``
leaves ``os.environ`` alone unless asked. Real transformers models built offline from configs,
real torch.compile (Inductor's C++ backend on the CPU)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import transformers
from test_db import make_result

import compilepass
from compilepass.core.env import current_environment
from compilepass.core.errors import ConfigError
from compilepass.db import ModelSignature, TuneKey, add_entries, entry_from_tune_result

selmod = importlib.import_module("compilepass.selection")  # the package attribute `select` is the function

#: Options whose effect shows in Inductor's generated C++ (and that the running torch has on CPU).
PROFILE = {"cpp.enable_kernel_profile": True}  # adds RecordFunctionHandle to every kernel
NO_SIZE_ASSERTS = {"size_asserts": False}  # removes assert_size_stride(arg0_1, ...)


def cpu_env() -> dict:
    return current_environment().to_dict()  # these tests run on a CPU-only machine


def entry(model="tiny-llama", kind="rollout", winner=None, signature=None, **sizes) -> dict:
    """A verified entry for the running CPU environment; ``signature`` re-keys it to another model."""
    e = entry_from_tune_result(make_result(env=cpu_env(), model=model, kind=kind, winner=winner, **sizes),
                               date="2026-11-01T00:00:00Z")
    if signature is not None:
        key = dataclasses.replace(TuneKey.from_dict(e["key"]), model=signature)
        e = dict(e, key=key.to_dict(), id=key.entry_id(), model_name=signature.family)
    return e


def gpt2(n_layer=1, vocab=64):
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def opt():
    cfg = transformers.OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                 vocab_size=64, max_position_embeddings=64, word_embed_proj_dim=32,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.OPTForCausalLM(cfg).eval()


def llama():
    from compilepass.core.models import build_model

    return build_model("tiny-llama", dtype=torch.float32)


def selection_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "compilepass.selection"]


@pytest.fixture
def user_db(tmp_path, monkeypatch):
    """A user database in a fresh cache dir, read by compile() (it has no entries argument)."""
    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(tmp_path / "cp"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    path = tmp_path / "cp" / "tuning_db.json"

    def add(*entries):
        add_entries(path, list(entries))
    return add


def test_a_rollout_entry_never_applies_to_a_training_forward(caplog):
    model = llama()
    env = current_environment()
    rollout = entry(winner=PROFILE, batch=4, prompt_len=8, new_tokens=8)
    with caplog.at_level(logging.INFO, logger="compilepass.selection"):
        sel = compilepass.select(model, "train", batch=2, seq_len=16, lora_rank=4, env=env, entries=[rollout])
    assert sel.flags == {} and sel.match_level == 5 and sel.basis == "torch defaults" and sel.entry_id is None
    assert "no measured native train entry" in sel.reason
    [line] = selection_lines(caplog)
    assert line.startswith("train llama 2x64 float32: torch defaults")
    train = entry(kind="train", winner=NO_SIZE_ASSERTS, batch=2)  # seq_len 128, lora_rank 16 (make_result)
    both = [rollout, train]
    sel = compilepass.select(model, "train", batch=2, seq_len=128, lora_rank=16, env=env, entries=both)
    assert (sel.flags, sel.entry_id, sel.basis) == (NO_SIZE_ASSERTS, train["id"], "exact entry")
    sel = compilepass.select(model, "train", batch=4, seq_len=64, env=env, entries=both)
    assert (sel.flags, sel.entry_id, sel.basis) == (NO_SIZE_ASSERTS, train["id"], "nearby size bucket")
    sel = compilepass.select(model, "rollout", batch=4, prompt_len=8, new_tokens=8, env=env, entries=both)
    assert (sel.flags, sel.entry_id, sel.basis) == (PROFILE, rollout["id"], "exact entry")


def test_any_causal_lm_family_gets_an_answer(tmp_path, caplog):
    env = current_environment()
    qwen3 = entry(model="tiny", winner=NO_SIZE_ASSERTS, batch=4, prompt_len=8, new_tokens=8)
    # a family the tuner measures takes another family's entry at the same torch and arch (level 4)
    sel = compilepass.select(llama(), batch=4, env=env, entries=[qwen3])
    assert (sel.flags, sel.basis) == (NO_SIZE_ASSERTS, "same torch and GPU architecture")
    # families the tuner cannot measure never take another architecture's flags: torch's defaults
    gpt2_dir = tmp_path / "gpt2"
    gpt2().config.save_pretrained(gpt2_dir)
    with caplog.at_level(logging.INFO, logger="compilepass.selection"):
        for model, family in ((gpt2(), "gpt2"), (opt(), "opt"), (str(gpt2_dir), "gpt2")):
            sel = compilepass.select(model, batch=4, env=env, entries=[qwen3])
            assert (sel.flags, sel.match_level, sel.basis) == ({}, 5, "torch defaults"), family
            assert f"of family {family} (other families' entries are not applied to it)" in sel.reason
    assert [line.split(":")[0] for line in selection_lines(caplog)] == [
        "rollout gpt2 1x32 float32", "rollout opt 1x32 float32", "rollout gpt2 1x32 float32"]
    # its own family's entry of a similar size is the family fallback (level 3)
    near = ModelSignature.from_hf_config(gpt2(vocab=80).config, "float32")
    own = entry(model="tiny", winner=PROFILE, signature=near, batch=4, prompt_len=8, new_tokens=8)
    sel = compilepass.select(gpt2(), batch=4, env=env, entries=[qwen3, own])
    assert (sel.flags, sel.entry_id, sel.basis) == (PROFILE, own["id"], "family fallback")
    # a model whose config gives no sizes, or that has no config: torch's defaults with the reason
    class Bare(torch.nn.Module):
        config = transformers.PretrainedConfig()

    for model in (Bare(), torch.nn.Linear(2, 2)):
        sel = compilepass.select(model, env=env, entries=[qwen3, own])
        assert (sel.flags, sel.basis, sel.entry_id) == ({}, "torch defaults", None)
        assert "no database key for" in sel.reason


def test_hub_id_from_the_local_cache(tmp_path):
    """A Hub id already downloaded is read from the Hugging Face cache, offline; `info` says what applies."""
    snap = tmp_path / "hub" / "models--someorg--tiny-gpt2"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    gpt2().config.save_pretrained(snap / "snapshots" / ("0" * 40))
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1",
               COMPILEPASS_CACHE_DIR=str(tmp_path / "cp"))
    out = subprocess.run([sys.executable, "-m", "compilepass.cli", "info", "--json", "--model", "someorg/tiny-gpt2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    sel = json.loads(out.stdout)["selection"]
    assert sel["flags"] == {} and sel["level_name"] == "safe-defaults" and "family gpt2" in sel["reason"]
    missing = subprocess.run([sys.executable, "-m", "compilepass.cli", "info", "--model", "someorg/not-here"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nor a Hub id in the local Hugging Face cache" in missing.stderr


def test_compile_applies_the_family_fallback_to_this_compile_only(user_db, caplog):
    """A real compile of a GPT-2 forward: its family's entry reaches Inductor's generated code, the
    global Inductor config is untouched, and the next plain torch.compile sees none of it."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    near = ModelSignature.from_hf_config(gpt2(vocab=80).config, "float32")
    flags = {**PROFILE, **NO_SIZE_ASSERTS}
    own = entry(model="tiny", winner=flags, signature=near, batch=2, prompt_len=8, new_tokens=8)
    user_db(own)
    model = gpt2()
    ids = torch.randint(0, 64, (2, 8))
    before = inductor_config.get_config_copy()
    torch._dynamo.reset()
    try:
        with caplog.at_level(logging.INFO, logger="compilepass.selection"):
            compiled = compilepass.compile(model, batch=2, dynamic=False)
        assert isinstance(compiled, torch.nn.Module)
        with torch.no_grad():
            out, code = run_and_get_code(lambda x: compiled(input_ids=x).logits, ids)
            torch.testing.assert_close(out, model(input_ids=ids).logits)
        src = "\n".join(code)
        assert "RecordFunctionHandle" in src and "assert_size_stride(arg0_1" not in src
        assert inductor_config.get_config_copy() == before  # nothing global was set

        def plain(x):
            return (x.sin() * 2).sum(0)

        _, code = run_and_get_code(torch.compile(plain), torch.randn(8, 4))
        assert "assert_size_stride(arg0_1" in "\n".join(code) and "RecordFunctionHandle" not in "\n".join(code)
    finally:
        torch._dynamo.reset()
    [line] = selection_lines(caplog)
    assert line.startswith("compile: rollout gpt2 1x32 float32: family fallback (workload inferred from "
                           "model.training=False; pass workload= to choose); similar-model: entry " + own["id"])
    assert "flags cpp.enable_kernel_profile=True, size_asserts=False" in line


@pytest.mark.slow
def test_compiled_training_forward_takes_the_train_entry(user_db, caplog):
    """A peft model in training mode: workload "train" inferred, its LoRA rank read from the adapter,
    the train entry's flags in the generated code and none of the rollout entry's; gradients match
    eager."""
    from torch._inductor.utils import run_and_get_code

    from compilepass.core.models import add_lora

    rollout = entry(winner=PROFILE, batch=2, prompt_len=8, new_tokens=8)
    train = entry(kind="train", winner=NO_SIZE_ASSERTS, batch=2)  # t128, r16
    user_db(rollout, train)
    model = add_lora(llama(), rank=16, alpha=32, seed=0, init_random=True, init_std=0.1)
    model.train()
    ids = torch.randint(0, 256, (2, 128))

    def loss_of(m):
        logits = m(input_ids=ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    loss_of(model).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    try:
        with caplog.at_level(logging.INFO, logger="compilepass.selection"):
            compiled = compilepass.compile(model, batch=2, seq_len=128, dynamic=False)

        def step():
            loss = loss_of(compiled)
            loss.backward()
            return loss

        _, code = run_and_get_code(step)
    finally:
        torch._dynamo.reset()
    src = "\n".join(code)
    assert "assert_size_stride(" not in src and "RecordFunctionHandle" not in src
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager[n], rtol=1e-4, atol=1e-5)
    [line] = selection_lines(caplog)
    assert line.startswith(f"compile: train llama 2x64 float32: exact entry (workload inferred from "
                           f"model.training=True; pass workload= to choose); exact: entry {train['id']}")


def test_compile_and_vllm_config_check_the_workload():
    with pytest.raises(ConfigError, match="rollout .generation. or train"):
        compilepass.compile(lambda x: x, workload="mlp")
    with pytest.raises(ConfigError, match="takes rollout entries"):
        compilepass.vllm_compilation_config("tiny", workload="train")


def test_vllm_compilation_config_leaves_the_environment_alone_unless_asked(monkeypatch):
    from test_select import H100, h100_env

    for name in (selmod.VLLM_ENV_MAX_AUTOTUNE, selmod.VLLM_ENV_COORDINATE_DESCENT):
        monkeypatch.setenv(name, "unset")  # restored after the test
    env = dict(H100, vllm="0.12.0")
    e = [entry_from_tune_result(make_result(winner={"max_autotune": True, "triton.cudagraphs": True}, env=env,
                                            engine="vllm"))]
    cfg = compilepass.vllm_compilation_config(model="qwen3-0.6b", batch=32, env=h100_env(vllm="0.12.0"), entries=e)
    assert cfg == {"inductor_compile_config": {"max_autotune": True}}  # cudagraph trees gated under vLLM
    assert os.environ[selmod.VLLM_ENV_MAX_AUTOTUNE] == os.environ[selmod.VLLM_ENV_COORDINATE_DESCENT] == "unset"
    assert selmod.vllm_env(cfg["inductor_compile_config"]) == {selmod.VLLM_ENV_MAX_AUTOTUNE: "1",
                                                              selmod.VLLM_ENV_COORDINATE_DESCENT: "0"}
    cfg = compilepass.vllm_compilation_config("qwen3-0.6b", batch=32, env=h100_env(vllm="0.12.0"), entries=e,
                                              apply_env=True)
    assert os.environ[selmod.VLLM_ENV_MAX_AUTOTUNE] == "1" and os.environ[selmod.VLLM_ENV_COORDINATE_DESCENT] == "0"
    # no entry: torch's defaults, and (asked) vLLM's own "1" defaults turned off to match
    cfg = compilepass.vllm_compilation_config("qwen3-0.6b", batch=32, env=h100_env(vllm="0.12.0"), entries=[],
                                              apply_env=True)
    assert cfg == {"inductor_compile_config": {}}
    assert os.environ[selmod.VLLM_ENV_MAX_AUTOTUNE] == os.environ[selmod.VLLM_ENV_COORDINATE_DESCENT] == "0"
    # a native-engine entry is never used for vLLM; any family gets a config
    native = [entry_from_tune_result(make_result(winner={"coordinate_descent_tuning": True}, env=env))]
    assert compilepass.vllm_compilation_config("qwen3-0.6b", batch=32, env=h100_env(vllm="0.12.0"),
                                               entries=native) == {"inductor_compile_config": {}}
    assert compilepass.vllm_compilation_config(gpt2(), env=h100_env(vllm="0.12.0"), entries=e) == {
        "inductor_compile_config": {}}

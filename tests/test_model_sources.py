"""Where a model comes from (a preset, a local directory, a Hub id in the local Hugging Face cache,
an object passed in Python) and families the native engine does not decode (GPT-2, Phi): trained
all the same, generating through transformers."""

from __future__ import annotations

import logging

import pytest
import torch
from family_helpers import char_tokenizer, family_config, make_family_dir

from compilepass.core.errors import ConfigError, ModelNotFoundError
from compilepass.core.hub import HubModelNotCachedError
from compilepass.core.models import build_model
from compilepass.core.shapes import local_model_path, resolve_model_source
from compilepass.standby.grpo.config import default_config, load_config
from compilepass.standby.grpo.metrics import read_metrics
from compilepass.standby.grpo.trainer import GRPOTrainer, run_grpo
from compilepass.standby.rollout.hf_backend import TransformersBackend, native_family_problem
from compilepass.standby.training.entropy import EntropyMeter, entropy_from_logits
from compilepass.standby.training.logprobs import hidden_state_head, policy_logprobs

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(tmp_path, repo_id: str, family: str = "gpt2"):
    """A Hugging Face hub cache holding ``repo_id`` as ``hf download`` lays it out:
    models--org--name/{refs/main, snapshots/<revision>/...}."""
    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    make_family_dir(repo / "snapshots" / REVISION, family)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return cache


def _config(tmp_path, model: str, *overrides, name="run"):
    return load_config(None, [f"model.name_or_path={model}", f"run.output_dir={tmp_path / name}", "run.max_steps=2",
                              "data.prompts_per_step=2", "generation.num_generations=4",
                              "generation.max_completion_len=6", *overrides], base=default_config("tiny"))


def test_hub_id_resolves_from_the_cache_only(tmp_path):
    cache = _hub_cache(tmp_path, "tiny-org/tiny-gpt2")
    path = local_model_path("tiny-org/tiny-gpt2", str(cache))
    assert path == str(cache / "models--tiny-org--tiny-gpt2" / "snapshots" / REVISION)
    assert resolve_model_source("tiny-org/tiny-gpt2", str(cache)) == "hub"
    model = build_model("tiny-org/tiny-gpt2", dtype=torch.float32, cache_dir=str(cache))
    assert model.config.model_type == "gpt2" and model.config.n_layer == 2


def test_missing_hub_id_is_one_line_naming_the_id_and_the_cache(tmp_path):
    cache = tmp_path / "empty-cache"
    with pytest.raises(HubModelNotCachedError) as e:
        local_model_path("someone/not-downloaded", str(cache))
    msg = str(e.value)
    assert "\n" not in msg and "'someone/not-downloaded'" in msg and str(cache) in msg and "hf download" in msg
    with pytest.raises(ModelNotFoundError, match="neither a preset"):  # a path is never taken for a Hub id
        local_model_path(str(tmp_path / "no" / "such" / "dir"))


def test_missing_hub_id_in_the_cli_exits_2_with_one_line(tmp_path, capsys):
    from compilepass.cli.app import main

    rc = main(["grpo", "--preset", "tiny", "model.name_or_path=someone/not-downloaded",
               f"model.cache_dir={tmp_path / 'cache'}", f"run.output_dir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "someone/not-downloaded" in err and "hf download" in err


def test_unsupported_family_trains_from_a_cached_hub_id(tmp_path, caplog):
    """GPT-2 (a family the native engine lacks), named by a Hub id in the local cache: a GRPO run
    completes, generating through transformers, said once in the log."""
    cache = _hub_cache(tmp_path, "tiny-org/tiny-gpt2")
    cfg = _config(tmp_path, "tiny-org/tiny-gpt2", f"model.cache_dir={cache}", "run.max_steps=3", "optim.lr=0.01",
                  "model.gradient_checkpointing=true")
    with caplog.at_level(logging.INFO):
        trainer = GRPOTrainer(cfg, progress=False)
        assert isinstance(trainer.engine, TransformersBackend)
        lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        try:
            summary = trainer.train()
        finally:
            trainer.close()
    notes = [r.getMessage() for r in caplog.records if "generating through transformers" in r.getMessage()]
    assert len(notes) == 1 and "'gpt2'" in notes[0]
    assert summary.final_step == 3 and len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 3
    rec = summary.metrics[-1]
    assert rec["completions/mean_length"] > 0 and rec["entropy"] > 0 and torch.isfinite(torch.tensor(rec["loss"]))
    # LoRA on GPT-2's Conv1D layers (peft's all-linear: the Llama names match nothing) was trained
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert any("c_attn" in n for n in changed)


def test_model_object_and_processing_class(tmp_path):
    """GRPOTrainer(config, model=<PreTrainedModel>, processing_class=<tokenizer>): Phi (its output
    head has a bias: log-probs through its own logits) trained from objects."""
    from transformers import AutoModelForCausalLM

    d = make_family_dir(tmp_path / "phi", "phi")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    cfg = _config(tmp_path, "tiny")
    trainer = GRPOTrainer(cfg, progress=False, model=model, processing_class=char_tokenizer())
    try:
        assert trainer.causal_lm is model and trainer.config.model.name_or_path == str(d)
        assert hidden_state_head(model) is None  # Phi's lm_head has a bias
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary.final_step == 2 and all(k in summary.metrics[-1] for k in ("reward", "entropy", "loss"))


def test_model_object_without_a_tokenizer_is_a_config_error(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(family_config("gpt2"))
    with pytest.raises(ConfigError, match="pass processing_class="):
        GRPOTrainer(_config(tmp_path, "tiny"), progress=False, model=model)


def test_peft_config_and_explicit_targets(tmp_path):
    from peft import LoraConfig

    d = make_family_dir(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ConfigError, match="name no module of this gpt2 model; its linear layers: .*c_attn"):
        GRPOTrainer(_config(tmp_path, str(d), "model.lora_targets=[q_proj]", name="bad"), progress=False)
    peft_config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(_config(tmp_path, str(d), "run.max_steps=1"), progress=False, peft_config=peft_config)
    try:
        trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        assert trained and all("c_fc" in n for n in trained) and trainer.model.peft_config["default"].r == 2
        trainer.train()
    finally:
        trainer.close()


@pytest.mark.parametrize("family", ["gpt2", "phi"])
def test_logprobs_and_entropy_match_the_models_logits(tmp_path, family):
    """policy_logprobs (GPT-2: the hidden-state kernel path; Phi: the logits path) and the entropy
    meter against log_softmax of the model's own logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_family_dir(tmp_path / family, family), dtype=torch.float32)
    assert (hidden_state_head(model) is not None) == (family == "gpt2")
    prompts = [[5, 6, 7], [8, 9]]
    comp = torch.tensor([[10, 11, 12, 1], [13, 14, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    meter = EntropyMeter()
    got = policy_logprobs(model, prompts, comp, mask, temperature=0.7, pad_token_id=0, entropy=meter)
    want, ents = torch.zeros(2, 4), []
    for b, p in enumerate(prompts):
        n = int(mask[b].sum())
        ids = torch.tensor([p + comp[b, :n].tolist()])
        z = model(input_ids=ids).logits[0, len(p) - 1:len(p) - 1 + n].float() / 0.7
        want[b, :n] = torch.log_softmax(z, -1).gather(-1, comp[b, :n, None]).squeeze(-1)
        ents.append(entropy_from_logits(z))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert meter.mean() == pytest.approx(float(torch.cat(ents).mean()), rel=1e-5)


def test_transformers_backend_matches_generate_and_reports_logprobs(tmp_path):
    """Greedy: the tokens of transformers' own ``generate``; the log-probs are log_softmax of the
    model's logits at each token; a stop token ends a row (kept, then padding); a seed repeats."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_family_dir(tmp_path / "g", "gpt2"), dtype=torch.float32).eval()
    assert native_family_problem(model) is not None
    backend = TransformersBackend(model, max_batch=2, max_len=32, pad_token_id=0)
    prompts = [[5, 6, 7, 8], [9, 10], [11]]  # 3 prompts, batches of 2: left padding inside a batch
    out = backend.generate(prompts, max_new_tokens=6, temperature=0.0)
    for b, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):]
        assert out.completion_ids[b].tolist() == ref.tolist()
        ids = torch.tensor([p + ref.tolist()])
        logits = model(input_ids=ids).logits[0, len(p) - 1:-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, ref[:, None]).squeeze(-1)
        torch.testing.assert_close(out.logprobs[b], lp, atol=1e-5, rtol=1e-5)
    stop = int(out.completion_ids[0, 2])
    cut = backend.generate(prompts[:1], max_new_tokens=6, temperature=0.0, stop_token_ids=[stop])
    first = out.completion_ids[0].tolist().index(stop)
    assert cut.completion_mask[0].tolist()[:first + 1] == [1] * (first + 1) and cut.completion_lengths[0] == first + 1
    a = backend.generate(prompts, max_new_tokens=6, temperature=1.0, top_k=20, seed=7)
    b = backend.generate(prompts, max_new_tokens=6, temperature=1.0, top_k=20, seed=7)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)

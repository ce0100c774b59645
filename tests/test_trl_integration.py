"""``compilepass.integrations.trl``: real TRL's GRPOTrainer generating with our rollout engine, on CPU.

A tiny random Qwen3 with a word-level tokenizer that has a chat template; a conversational
``datasets.Dataset``; one of the reward functions TRL ships and one of ours; a peft LoRA config;
TRL trains, we generate."""

from __future__ import annotations

import pytest
import torch

import trl  # the dev extra's: a missing TRL fails here, it is not skipped

from compilepass.core.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PAD, EOS = 0, 1
WORDS = [f"w{i}" for i in range(40)] + ["<think>", "</think>", "user", "assistant", ":"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from compilepass.core.shapes import ModelShape

    path = tmp_path_factory.mktemp("trl-integration")
    vocab = {"<pad>": PAD, "<eos>": EOS, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    shape = ModelShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                       vocab_size=64, family="qwen3", tie_word_embeddings=True, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shape.to_hf_config(), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.config.eos_token_id, model.config.pad_token_id = EOS, PAD
    model.save_pretrained(path)
    return path


def _dataset():
    from datasets import Dataset

    rows = [[{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}] for i in range(0, 16, 2)]
    return Dataset.from_dict({"prompt": rows, "target": [f"w{i}" for i in range(0, 16, 2)]})


def says_target(completions, target, **kwargs):
    """Our reward, TRL's calling convention: 1 if the completion's text holds the row's target word."""
    return [float(t in c[0]["content"].split()) for c, t in zip(completions, target)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, bf16=False, max_steps=2,
                per_device_train_batch_size=4, num_generations=4, max_completion_length=8, learning_rate=5e-2,
                logging_steps=1, save_strategy="no", seed=0, temperature=1.0)
    base.update(kw)
    return trl.GRPOConfig(**base)


def test_trl_trains_while_our_engine_generates(model_dir, tmp_path):
    from peft import LoraConfig
    from trl.rewards import think_format_reward

    from compilepass.integrations.trl import GRPOTrainer
    from compilepass.standby.training.logprobs import policy_logprobs

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[think_format_reward, says_target], args=_args(tmp_path),
                          train_dataset=_dataset(),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                          rollout_engine_options={"compile_options": False})
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora, "peft wrapped the model"
    trainer.train()
    assert trainer.rollout_calls >= 2 and trainer.rollout_engine is not None
    assert not trainer.rollout_engine.is_awake  # standby while TRL trains
    assert trainer.logprobs_path == "compilepass"  # TRL's loss ran on our kernel's log-probs
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])]
    assert changed, "TRL's optimizer changed no LoRA tensor"
    logged = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logged) >= 2 and all("rewards/says_target/mean" in h for h in logged), trainer.state.log_history
    # the engine samples from the policy being trained, LoRA included: its log-probs are the policy's
    prompts = [[{"role": "user", "content": "w3 w4 w5"}], [{"role": "user", "content": "w7"}]]
    out = trainer.generate_with_engine(prompts)
    assert out["prompt_ids"][0] == trainer.processing_class.apply_chat_template(
        prompts[0], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    n = max(len(c) for c in out["completion_ids"])
    ids = torch.tensor([c + [PAD] * (n - len(c)) for c in out["completion_ids"]])
    mask = torch.tensor([[1] * len(c) + [0] * (n - len(c)) for c in out["completion_ids"]])
    with torch.no_grad():
        ref = policy_logprobs(trainer.model, out["prompt_ids"], ids, mask, 1.0, PAD)
    ours = torch.tensor([lp + [0.0] * (n - len(lp)) for lp in out["logprobs"]])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    for c in out["completion_ids"]:
        assert EOS not in c[:-1] and len(c) <= 8  # stops at TRL's EOS, at most max_completion_length


def _batch(rows=4, completion=6, seed=0):
    """A TRL-shaped training batch: left-padded prompts, right-padded completions, their masks."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, 40, (rows, 5), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :2] = 0  # left padding
    prompt[0, :2] = PAD
    comp = torch.randint(2, 40, (rows, completion), generator=g)
    comp_mask = torch.ones_like(comp)
    comp_mask[1, 3:] = 0  # a short completion
    comp[1, 3:] = PAD
    return torch.cat([prompt, comp], 1), torch.cat([prompt_mask, comp_mask], 1), completion


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_logprobs_through_our_kernels_equal_trls_fused_head(model_dir, tmp_path, temperature):
    """The integration's training-side log-probs, entropies and LoRA gradients (compilepass's kernel)
    against TRL's own fused head on the same batch, the same trainer and weights."""
    from peft import LoraConfig

    from compilepass.integrations.trl import GRPOTrainer

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=says_target, args=_args(tmp_path, temperature=temperature),
                          train_dataset=_dataset(), peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                           target_modules=["q_proj", "v_proj"]),
                          rollout_engine_options={"compile_options": False})
    ids, mask, keep = _batch()
    lora = [p for p in trainer.model.parameters() if p.requires_grad]
    results = {}
    for path in (True, False):
        trainer.kernel_logprobs = path
        trainer.model.zero_grad(set_to_none=True)
        logps, ents, aux = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep, batch_size=3,
                                                                      compute_entropy=True)
        (logps * torch.linspace(-1, 1, logps.numel()).view_as(logps)).sum().backward()
        results[path] = (logps.detach(), ents.detach(), [p.grad.clone() for p in lora], trainer.logprobs_path)
        assert aux is None and logps.shape == ents.shape == (ids.shape[0], keep)
    ours, theirs = results[True], results[False]
    assert ours[3] == "compilepass" and theirs[3] == "trl: kernel_logprobs=False"
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert (ours[0][1, 3:] == 0).all() and (ours[1][1, 3:] == 0).all()  # padding: 0, as TRL writes it
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # no entropy asked: none computed
    with torch.no_grad():
        trainer.kernel_logprobs = True
        logps, ents, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
    assert ents is None
    torch.testing.assert_close(logps, ours[0], rtol=1e-5, atol=1e-5)


def test_training_logprobs_fall_back_to_trl_for_an_entropy_bonus(model_dir, tmp_path):
    from compilepass.integrations.trl import GRPOTrainer

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=says_target, args=_args(tmp_path, entropy_coef=0.01),
                          train_dataset=_dataset(), rollout_engine_options={"compile_options": False})
    ids, mask, keep = _batch()
    _, ents, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep, compute_entropy=True)
    assert trainer.logprobs_path.startswith("trl: an entropy bonus")
    assert ents.requires_grad  # TRL's entropy, with the gradient the bonus needs
    with pytest.raises(ConfigError, match="kernel_logprobs must be True or False"):
        GRPOTrainer(model=str(model_dir), reward_funcs=says_target, args=_args(tmp_path), train_dataset=_dataset(),
                    kernel_logprobs="yes")


def test_unsupported_options_are_one_line_errors(model_dir, tmp_path):
    from compilepass.integrations.trl import GRPOTrainer

    with pytest.raises(ConfigError, match="rollout_func"):
        GRPOTrainer(model=str(model_dir), reward_funcs=says_target, args=_args(tmp_path), train_dataset=_dataset(),
                    rollout_func=lambda p, t: {})
    with pytest.raises(ConfigError, match="repetition_penalty"):
        GRPOTrainer(model=str(model_dir), reward_funcs=says_target, args=_args(tmp_path, repetition_penalty=1.2),
                    train_dataset=_dataset())


def test_trl_version_is_checked(monkeypatch):
    from compilepass.integrations.trl import SUPPORTED_TRL, TrlVersionError, check_trl

    assert check_trl() is trl
    monkeypatch.setattr(trl, "__version__", "0.9.0")
    with pytest.raises(TrlVersionError, match="supports TRL " + SUPPORTED_TRL.replace("<", ".")):
        check_trl()


@pytest.mark.slow
def test_compile_train_compiles_the_training_forward_with_train_flags(model_dir, tmp_path, caplog):
    """``compile_train=True``: the training forward's body (the decoder stack, which our kernel path
    and TRL's fused head both call) runs through torch.compile (in place: the same modules, optimizer
    and adapter), with flags selected for workload train, and training still moves the adapter."""
    import logging

    from peft import LoraConfig

    from compilepass.integrations.trl import GRPOTrainer

    caplog.set_level(logging.INFO, logger="compilepass.selection")
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[says_target], args=_args(tmp_path, max_steps=1),
                          train_dataset=_dataset(), compile_train=True,
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                          rollout_engine_options={"compile_options": False})
    sel = trainer.train_compile_selection
    assert sel is not None and sel.workload == "train"
    body = trainer.model.get_base_model().model  # the decoder stack both log-prob paths call
    assert body._compiled_call_impl is not None  # nn.Module.compile: the module itself is compiled
    assert any("compile: train" in r.getMessage() for r in caplog.records)
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    from torch._dynamo.utils import counters

    frames_before = counters["stats"]["unique_graphs"]
    trainer.train()
    assert counters["stats"]["unique_graphs"] > frames_before  # the forward was traced and compiled
    moved = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, lora[n])]
    assert moved, "the compiled training forward did not train the adapter"


def test_compile_train_is_off_by_default_and_checked(model_dir, tmp_path):
    from compilepass.integrations.trl import GRPOTrainer

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[says_target], args=_args(tmp_path),
                          train_dataset=_dataset())
    assert trainer.train_compile_selection is None
    from compilepass.core.shapes import causal_lm_of

    assert causal_lm_of(trainer.model).base_model._compiled_call_impl is None
    auto = GRPOTrainer(model=str(model_dir), reward_funcs=[says_target], args=_args(tmp_path),
                       train_dataset=_dataset(), compile_train="auto")
    assert auto.train_compile_selection is None  # "auto" compiles on CUDA only
    with pytest.raises(ConfigError, match="compile_train"):
        GRPOTrainer(model=str(model_dir), reward_funcs=[says_target], args=_args(tmp_path), train_dataset=_dataset(),
                    compile_train="yes")

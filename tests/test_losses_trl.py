"""Our loss against real TRL (``trl.GRPOTrainer``, the version in the dev extra) on CPU.

A tiny random Qwen2 model and a word-level tokenizer are saved to a directory; each case builds a
real ``trl.GRPOTrainer`` from it (``use_cpu``, ``bf16=False``: TRL defaults to bf16 autocast,
ours runs float32) with the case's TRL options, and compares on one fixed batch:

* ``_compute_loss(model, inputs)`` (TRL's own log-probs of the model, its loss) and its gradients
  on every parameter, against :func:`policy_logprobs` + :func:`micro_batch_loss` on the same model
  in two micro-batches (rows 0-3 and 4-5: our micro-batching is checked against TRL's whole
  batch), for every loss type both have (grpo, bnpo, dr_grpo, dapo, cispo), token and sequence
  (GSPO) importance sampling, beta 0 and 0.04 with and without TRL's KL bias correction; and
  TRL's clip / KL metrics.
* ``_generate_and_score_completions`` + ``_compute_loss``: TRL generating through a
  ``rollout_func`` that hands back fixed completions and their sampling log-probs (what a vLLM
  server returns), so TRL itself masks the truncated completions, scores them, computes the
  advantages, the old log-probs and the truncated importance-sampling ratio of every
  ``vllm_importance_sampling_mode``; against our truncation mask, advantages, importance weights,
  loss, gradients and ``sampling/*`` metrics from the same completions.

What TRL cannot do here: its importance-sampling correction is gated on ``use_vllm``, and
``use_vllm=True`` builds a vLLM engine in ``GRPOTrainer.__init__`` (vLLM is not installed on the
CPU test machine). The trainer is therefore built without vLLM and then marked ``use_vllm =
True`` with its weight sync marked done (``_last_loaded_step``: there is no vLLM to sync); every
line of TRL that computes and applies the ratio then runs unchanged. ``current_gradient_accumulation_steps``
is set to 1, the value ``Trainer.train`` sets for ``gradient_accumulation_steps=1`` (the attribute
exists only inside ``train``).
"""

from __future__ import annotations

import pytest
import torch

import trl  # the dev extra's: a missing TRL fails here, it is not skipped

from compilepass.standby.training.importance import rollout_importance_weights
from compilepass.standby.training.logprobs import policy_logprobs
from compilepass.standby.training.loss import combine_metrics, group_advantages, micro_batch_loss
from compilepass.standby.training.truncation import mask_truncated, truncated_completions

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PAD, EOS = 0, 1
B, P, T, G = 6, 3, 7, 3  # rows, prompt length, max completion length, generations per prompt
TEMPERATURE = 0.9
CUTS = (0, 4, 6)  # our micro-batches


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen2 causal LM and a word-level tokenizer (ids: <pad> 0, <eos> 1, w0..w61 2..63)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("trl-tiny")
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i + 2 for i in range(62)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # weights large enough for a peaked, non-uniform policy
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def reward_ids(completion_ids, **kwargs):
    return [float(sum(c) % 7) for c in completion_ids]


def _trainer(model_dir, tmp_path, **options):
    from datasets import Dataset

    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                          per_device_train_batch_size=B, num_generations=G, max_completion_length=T,
                          temperature=TEMPERATURE, epsilon=0.2, seed=0, **options)
    ds = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5 w6"]})
    trainer = trl.GRPOTrainer(model=str(model_dir), reward_funcs=reward_ids, args=args, train_dataset=ds)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def _grads(params):
    out = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return out


def _assert_grads_close(ours, theirs):
    assert any(t.abs().sum() > 0 for t in theirs)
    for a, b in zip(ours, theirs):
        scale = max(b.abs().max().item(), 1e-8)
        assert (a - b).abs().max().item() <= 1e-4 * scale + 1e-9


def _ours(model, prompts, comp, mask, adv, old, ref, n_items, **kw):
    """Our loss, its gradients and metrics, in the micro-batches CUTS."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, acc = 0.0, {}
    for lo, hi in zip(CUTS[:-1], CUTS[1:]):
        sl = slice(lo, hi)
        logp = policy_logprobs(model, prompts[sl], comp[sl], mask[sl], TEMPERATURE, PAD)
        loss, m = micro_batch_loss(logp, old, ref, adv, mask, n_items, sl, max_completion_length=T, **kw)
        loss.backward()
        total = total + loss.detach()
        combine_metrics(acc, m, mask[sl].sum() / n_items.clamp(min=1))
    return total, _grads(params), acc


def _fixed_batch(model):
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(2, 64, (B, P), generator=g)
    comp = torch.randint(2, 64, (B, T), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 7, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    comp = comp.masked_fill(mask == 0, PAD)
    adv = torch.randn(B, generator=g)
    prompts = [p.tolist() for p in prompt_ids]
    with torch.no_grad():
        lp = policy_logprobs(model, prompts, comp, mask, TEMPERATURE, PAD)
    old = (lp + 0.3 * torch.randn(B, T, generator=g)) * mask
    ref = (lp + 0.3 * torch.randn(B, T, generator=g)) * mask
    return prompt_ids, prompts, comp, mask, adv, old, ref


KL = {"no_kl": (0.0, False), "kl": (0.04, False), "kl_bias_corrected": (0.04, True)}


@pytest.mark.parametrize("kl", list(KL))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_loss_and_gradients_equal_trl(model_dir, tmp_path, loss_type, level, kl):
    beta, bias = KL[kl]
    eps_high = 1.1 if loss_type == "cispo" else 0.28  # cispo: a cap (TRL's epsilon_max), low enough to bind
    trainer = _trainer(model_dir, tmp_path, loss_type=loss_type, importance_sampling_level=level, beta=beta,
                       epsilon_high=eps_high, use_bias_correction_kl=bias)
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    prompt_ids, prompts, comp, mask, adv, old, ref = _fixed_batch(model)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": comp,
              "completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": mask.sum()}
    if beta > 0:
        inputs["ref_per_token_logps"] = ref
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    g_theirs = _grads(params)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours, g_ours, m = _ours(model, prompts, comp, mask.float(), adv, old, ref if beta > 0 else None, mask.sum(),
                            loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=eps_high,
                            importance_sampling_level=level, use_bias_correction_kl=bias)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-7)
    _assert_grads_close(g_ours, g_theirs)
    if beta > 0:
        assert float(m["kl"]) == pytest.approx(trl_metrics["kl"], rel=1e-4, abs=1e-7)
    if loss_type == "cispo":
        assert float(m["cispo_clip_ratio"]) > 0  # the cap binds on this batch
        if level == "token":
            assert float(m["cispo_clip_ratio"]) == pytest.approx(trl_metrics["cispo_clip_ratio"], rel=1e-5)
    elif level == "token":  # (sequence level: TRL averages the clip flags over sequences, ours over tokens)
        assert float(m["clip_ratio/region_mean"]) > 0
        for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert float(m[k]) == pytest.approx(trl_metrics[k], rel=1e-5, abs=1e-7), k


# Completions as a rollout backend returns them: some end on EOS, the rest ran out (truncated).
COMPLETIONS = [[5, 9, 12, 3, 8, 40, 22], [7, 7, EOS], [30, 31, 32, 33, EOS], [44, 45, 46, 47, 48, 49, 50],
               [11, EOS], [60, 2, 19, 25, 25, 3, 9]]
PROMPTS = {"w1 w2 w3": [3, 4, 5], "w4 w5 w6": [6, 7, 8]}


@pytest.mark.parametrize("mode, loss_type, level", [
    ("token_truncate", "dapo", "token"), ("token_mask", "dapo", "token"),
    ("sequence_truncate", "dapo", "token"), ("sequence_mask", "dapo", "token"),
    ("token_truncate", "grpo", "sequence"), ("sequence_mask", "grpo", "sequence"),
    ("sequence_truncate", "cispo", "token"), (None, "bnpo", "token"),
])
def test_rollout_correction_and_truncation_equal_trl(model_dir, tmp_path, monkeypatch, mode, loss_type, level):
    """TRL scores fixed completions from a rollout_func (with sampling log-probs off the policy's by
    noise), masks the truncated ones, computes old log-probs and the IS ratio; our pipeline does the
    same from the same completions. Mode None: mask_truncated_completions without the correction."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    # bounds that this batch crosses on both sides of the kept range (sequence ratios are products)
    clip_min, clip_max = {None: (None, 3.0), "token": (0.7, 1.4), "sequence": (0.5, 2.0)}[mode and mode.split("_")[0]]
    eps_high = 1.1 if loss_type == "cispo" else 0.28
    options = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_high=eps_high,
                   mask_truncated_completions=True, vllm_importance_sampling_correction=mode is not None,
                   vllm_importance_sampling_clip_min=clip_min, vllm_importance_sampling_clip_max=clip_max)
    if mode is not None:
        options["vllm_importance_sampling_mode"] = mode
    prompt_list = [PROMPTS["w1 w2 w3"]] * G + [PROMPTS["w4 w5 w6"]] * G
    comp = torch.tensor([c + [PAD] * (T - len(c)) for c in COMPLETIONS])
    emask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in COMPLETIONS])

    # sampling log-probs: the policy's own, off by noise (the engine-vs-trainer gap the ratio corrects)
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        true_lp = policy_logprobs(policy, prompt_list, comp, emask, TEMPERATURE, PAD)
    g = torch.Generator().manual_seed(2)
    sampling = (true_lp + 0.5 * torch.randn(B, T, generator=g)) * emask

    def rollout_func(prompts, trainer):
        assert [PROMPTS[p] for p in prompts] == prompt_list
        return {"prompt_ids": prompt_list, "completion_ids": [list(c) for c in COMPLETIONS],
                "logprobs": [sampling[b, :len(c)].tolist() for b, c in enumerate(COMPLETIONS)]}

    from datasets import Dataset

    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                          per_device_train_batch_size=B, num_generations=G, max_completion_length=T,
                          temperature=TEMPERATURE, epsilon=0.2, seed=0, **options)
    trainer = trl.GRPOTrainer(model=str(model_dir), reward_funcs=reward_ids, args=args,
                              train_dataset=Dataset.from_dict({"prompt": list(PROMPTS)}), rollout_func=rollout_func)
    trainer.current_gradient_accumulation_steps = 1
    if mode is not None:  # see the module docstring: the correction is gated on use_vllm
        trainer.use_vllm = True
        trainer._last_loaded_step = trainer.state.global_step
    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    examples = [{"prompt": p} for p in ["w1 w2 w3"] * G + ["w4 w5 w6"] * G]
    batch = trainer._generate_and_score_completions(examples)
    theirs = trainer._compute_loss(model, batch)
    theirs.backward()
    g_theirs = _grads(params)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    truncated = truncated_completions(comp, emask, stop_ids=[EOS])
    assert truncated.tolist() == [True, False, False, True, False, True]
    mask = mask_truncated(emask, truncated)
    torch.testing.assert_close(batch["completion_mask"], mask)
    adv, _ = group_advantages(torch.tensor(reward_ids(COMPLETIONS)), G)
    torch.testing.assert_close(batch["advantages"], adv)
    kw = dict(loss_type=loss_type, beta=0.0, epsilon_low=0.2, epsilon_high=eps_high, importance_sampling_level=level)
    if mode is not None:
        weights, _ = rollout_importance_weights(batch["old_per_token_logps"], sampling, mask.float(), mode,
                                                clip_min, clip_max)
        torch.testing.assert_close(weights, batch["importance_sampling_ratio"])
        assert (weights != 1).any()
        if mode.endswith("mask"):
            assert (weights == 0).any()  # something was masked
        else:
            assert ((weights == clip_min) | (weights == clip_max)).any()  # something was truncated
        kw.update(sampling=sampling, is_mode=mode, is_clip_min=clip_min, is_clip_max=clip_max)
    ours, g_ours, m = _ours(model, prompt_list, comp, mask.float(), adv, None, None, mask.sum(), **kw)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-7)
    _assert_grads_close(g_ours, g_theirs)
    assert trl_metrics["completions/clipped_ratio"] == pytest.approx(float(truncated.float().mean()))
    if mode is not None:
        names = ["sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max"]
        if mode.startswith("token"):  # (sequence modes: TRL's ratio statistics are over rows, ours over tokens)
            names += [f"sampling/importance_sampling_ratio/{s}" for s in ("min", "mean", "max")]
        for k in names:
            assert float(m[k]) == pytest.approx(trl_metrics[k], rel=1e-5, abs=1e-7), k

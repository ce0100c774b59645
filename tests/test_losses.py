"""The loss variants TRL users ask for (issue 19): CISPO, GSPO (sequence-level importance weights),
the KL bias correction, truncated importance sampling of the rollout engine's log-probs, and
mask_truncated_completions. Each against a plain PyTorch formula over materialized logits (values
and gradients), hand-computed values, the Triton kernel (interpreter on CPU), micro-batch
equivalence (unit and in the trainer), and the config's one-line errors. TRL itself:
tests/test_losses_trl.py."""

from __future__ import annotations

import math

import pytest
import torch

from compilepass.core.errors import ConfigError
from compilepass.kernels._triton_support import triton_available
from compilepass.kernels.grpo_loss import grpo_loss_reference, grpo_loss_triton
from compilepass.kernels.logprobs import selective_log_softmax_chunked
from compilepass.standby.grpo.config import default_config, load_config
from compilepass.standby.grpo.trainer import GRPOTrainer
from compilepass.standby.training.importance import rollout_importance_weights
from compilepass.standby.training.loss import combine_metrics, micro_batch_loss
from compilepass.standby.training.truncation import mask_truncated, truncated_completions

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
#: (beta, use_bias_correction_kl, is_weight kind)
VARIANTS = {"plain": (0.0, False, None), "kl": (0.05, False, None), "kl_bias": (0.05, True, None),
            "is_token": (0.0, False, "token"), "is_seq_kl_bias": (0.05, True, "seq")}


def _case(seed=0, B=5, T=9, H=16, V=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.6
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[1] = 0  # a fully masked row
    mask[3, 0] = 1
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        lp = _materialized_logprobs(hidden, weight, ids, 0.8)
    old = lp + 0.35 * torch.randn(B, T, generator=g)
    ref = lp + 0.3 * torch.randn(B, T, generator=g)
    isw = {"token": torch.rand(B, T, generator=g) * 2, "seq": torch.rand(B, generator=g) * 2}
    return hidden, weight, ids, mask, adv, old, ref, isw


def _materialized_logprobs(hidden, weight, ids, temperature):
    logits = hidden @ weight.T / temperature  # [B, T, V]: the logits the kernels never build
    return logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]


def _plain_loss(logp, old, ref, adv, mask, *, loss_type, level, beta, kl_bias, isw, eps_low, eps_high, max_len,
                n_items):
    """The objective written out sequence by sequence, token by token (TRL's definitions)."""
    B, T = logp.shape
    row_sums, row_counts = [], []
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t] > 0]
        if level == "sequence":
            mean_lr = sum(logp[b, t] - old[b, t] for t in toks) / max(len(toks), 1) if toks else logp[b, 0] * 0
            seq_coef = torch.exp(mean_lr)
        total = logp[b, 0] * 0
        for t in toks:
            coef = seq_coef if level == "sequence" else torch.exp(logp[b, t] - old[b, t])
            a = float(adv[b])
            if loss_type == "cispo":
                term = -min(float(coef.detach()), eps_high) * a * logp[b, t]
            else:
                term = -torch.minimum(coef * a, coef.clamp(1 - eps_low, 1 + eps_high) * a)
            if isw is not None:
                term = term * float(isw[b, t] if isw.dim() == 2 else isw[b])
            if beta > 0:
                d = ref[b, t] - logp[b, t]
                kl = torch.exp(d) - d - 1
                term = term + beta * (kl * coef if kl_bias else kl)
            total = total + term
        row_sums.append(total)
        row_counts.append(len(toks))
    n_tokens = max(sum(row_counts), 1)
    if loss_type == "grpo":
        return sum(s / max(n, 1) for s, n in zip(row_sums, row_counts)) / B
    if loss_type == "bnpo":
        return sum(row_sums) / n_tokens
    if loss_type == "dr_grpo":
        return sum(row_sums) / (B * max_len)
    return sum(row_sums) / n_items


def _kernel_fns():
    return [grpo_loss_reference] + ([grpo_loss_triton] if triton_available() else [])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSSES)
def test_kernels_equal_the_plain_formula_over_materialized_logits(loss_type, level, variant):
    """Log-probs (chunked, no logits) + loss (reference and Triton) against the written-out objective
    over materialized logits: the loss and its gradient to the hidden states."""
    beta, kl_bias, isw_kind = VARIANTS[variant]
    hidden, weight, ids, mask, adv, old, ref, isw_all = _case(seed=LOSSES.index(loss_type) * 20 + list(VARIANTS).index(variant) * 2 + (level == "sequence"))
    isw = None if isw_kind is None else isw_all[isw_kind]
    eps_high = 1.3 if loss_type == "cispo" else 0.28
    kw = dict(loss_type=loss_type, beta=beta, max_completion_length=12, num_items_in_batch=31)
    h = hidden.clone().requires_grad_(True)
    expected = _plain_loss(_materialized_logprobs(h, weight, ids, 0.8), old, ref, adv, mask, level=level,
                           kl_bias=kl_bias, isw=isw, eps_low=0.2, eps_high=eps_high, max_len=12, n_items=31,
                           loss_type=loss_type, beta=beta)
    expected.backward()
    g_expected = h.grad
    assert g_expected.abs().sum() > 0
    for fn in _kernel_fns():
        h = hidden.clone().requires_grad_(True)
        logp = selective_log_softmax_chunked(h, weight, ids, 0.8)
        loss, metrics = fn(logp, old, ref, adv, mask, 0.2, eps_high, importance_sampling_level=level, is_weight=isw,
                           use_bias_correction_kl=kl_bias, **kw)
        loss.backward()
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6, msg=fn.__name__)
        torch.testing.assert_close(h.grad, g_expected, rtol=1e-4, atol=1e-6, msg=fn.__name__)
        assert h.grad[1].abs().sum() == 0  # the fully masked row
        assert ("cispo_clip_ratio" in metrics) == (loss_type == "cispo")


def test_hand_computed_gspo_and_cispo():
    # GSPO: one sequence, log-ratios (log 2, 0): weight exp(log 2 / 2) = sqrt 2 for both tokens
    logp = torch.tensor([[math.log(2.0), 0.0]])
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    for a, value, grad in ((1.0, -1.2, [0.0, 0.0]),  # clipped at 1 + 0.2: no gradient
                           (-1.0, math.sqrt(2), [math.sqrt(2) / 2] * 2)):  # unclipped: d sqrt2 / d logp_t = sqrt2 / 2
        x = logp.clone().requires_grad_(True)
        loss, m = grpo_loss_reference(x, old, None, torch.tensor([a]), mask, importance_sampling_level="sequence")
        loss.backward()
        torch.testing.assert_close(loss, torch.tensor(value))
        torch.testing.assert_close(x.grad, torch.tensor([grad]))
        assert float(m["clip_ratio/region_mean"]) == (1.0 if a > 0 else 0.0)
    # token level on the same numbers: only the first token (ratio 2) is clipped
    loss, m = grpo_loss_reference(logp, old, None, torch.tensor([1.0]), mask)
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 1.0) / 2))
    # CISPO: ratio 3 capped at 2, ratio 0.5 kept; -w * A * logp, summed / tokens; gradient -w * A / tokens
    logp = torch.tensor([[math.log(3.0), math.log(0.5)]])
    x = logp.clone().requires_grad_(True)
    loss, m = grpo_loss_reference(x, old, None, torch.tensor([2.0]), mask, epsilon_high=2.0, loss_type="cispo")
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-(2 * 2 * math.log(3.0) + 0.5 * 2 * math.log(0.5)) / 2))
    torch.testing.assert_close(x.grad, torch.tensor([[-2.0 * 2 / 2, -0.5 * 2 / 2]]))
    torch.testing.assert_close(m["cispo_clip_ratio"], torch.tensor(0.5))


@needs_triton
@pytest.mark.parametrize("loss_type", LOSSES)
def test_triton_matches_reference_on_the_new_options(loss_type):
    g = torch.Generator().manual_seed(3)
    B, T = 7, 37
    logp = -torch.rand(B, T, generator=g) * 4
    old = logp + 0.5 * torch.randn(B, T, generator=g)
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    adv, mask = torch.randn(B, generator=g), (torch.rand(B, T, generator=g) > 0.3).float()
    mask[4] = 0
    for level in ("token", "sequence"):
        for old_ in (None, old):
            for isw in (None, torch.rand(B, T, generator=g), torch.rand(B, 1, generator=g)):
                for beta, bias in ((0.0, False), (0.04, True)):
                    kw = dict(loss_type=loss_type, beta=beta, importance_sampling_level=level, is_weight=isw,
                              use_bias_correction_kl=bias, epsilon_high=1.2 if loss_type == "cispo" else 0.28)
                    out = []
                    for fn in (grpo_loss_reference, grpo_loss_triton):
                        x = logp.clone().requires_grad_(True)
                        loss, m = fn(x, old_, ref, adv, mask, **kw)
                        (loss * 0.7).backward()
                        out.append((loss.detach(), x.grad, m))
                    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-7)
                    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-8)
                    assert out[1][2].keys() == out[0][2].keys()
                    for k in out[0][2]:
                        torch.testing.assert_close(out[1][2][k], out[0][2][k], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_triton_cuda_matches_reference_on_the_new_options(loss_type, level):
    g = torch.Generator().manual_seed(8)
    B, T = 16, 1000
    logp = -torch.rand(B, T, generator=g) * 4
    old, ref = logp + 0.4 * torch.randn(B, T, generator=g), logp + 0.3 * torch.randn(B, T, generator=g)
    adv, mask, isw = torch.randn(B, generator=g), (torch.rand(B, T, generator=g) > 0.25).float(), torch.rand(B, T, generator=g)
    mask[3] = 0
    args = [t.cuda() for t in (old, ref, adv, mask)]
    kw = dict(loss_type=loss_type, beta=0.04, epsilon_high=1.2 if loss_type == "cispo" else 0.28,
              importance_sampling_level=level, is_weight=isw.cuda(), use_bias_correction_kl=True)
    out = []
    for fn in (grpo_loss_reference, grpo_loss_triton):
        x = logp.cuda().requires_grad_(True)
        loss, m = fn(x, *args, **kw)
        loss.backward()
        out.append((loss.detach(), x.grad, m))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-9)
    for k in out[0][2]:
        torch.testing.assert_close(out[1][2][k], out[0][2][k], rtol=1e-5, atol=1e-7)


def test_bad_loss_arguments_raise():
    x, m, a = torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss_reference(x, None, None, a, m, importance_sampling_level="sentence")
    with pytest.raises(ValueError, match="is_weight"):
        grpo_loss_reference(x, None, None, a, m, is_weight=torch.ones(3))


# ----------------------------------------------------------------------- rollout importance weights


def test_rollout_importance_weights_each_mode():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    samp = torch.tensor([[-2.0, -1.9, float("nan")], [-0.2, -1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    d = torch.tensor([[1.0, -0.1, 0.0], [-0.8, 0.5, 0.0]])  # (old - sampling) * mask, NaN -> 0
    e = d.exp()
    cases = {
        ("token_truncate", 0.5, 2.0): e.clamp(0.5, 2.0),
        ("token_truncate", None, 2.0): e.clamp(max=2.0),
        ("token_mask", 0.5, 2.0): torch.where((e < 0.5) | (e > 2.0), 0.0, e),
        ("sequence_truncate", None, 2.0): d.sum(-1, keepdim=True).exp().clamp(max=2.0),
        ("sequence_mask", 0.5, 2.0): torch.tensor([[0.0], [math.exp(-0.3)]]),  # exp(0.9) > 2 is masked
    }
    for (mode, lo, hi), expected in cases.items():
        w, metrics = rollout_importance_weights(old, samp, mask, mode, lo, hi)
        torch.testing.assert_close(w, expected, msg=mode)
        assert not w.requires_grad
        wt = w.expand_as(mask)[mask > 0]
        torch.testing.assert_close(metrics["sampling/importance_sampling_ratio/mean"], wt.mean())
        torch.testing.assert_close(metrics["sampling/importance_sampling_ratio/max"], wt.max())
        torch.testing.assert_close(metrics["sampling/sampling_logp_difference/max"], torch.tensor(1.0))
    # a NaN-scored token carries weight 1 and stays out of the difference metrics
    w, metrics = rollout_importance_weights(old, samp, mask, "token_truncate", None, 100.0)
    assert w[0, 2] == 1.0
    torch.testing.assert_close(metrics["sampling/sampling_logp_difference/mean"],
                               torch.tensor([1.0, 0.1, 0.8, 0.5]).mean())
    with pytest.raises(ValueError, match="mode"):
        rollout_importance_weights(old, samp, mask, "token")


def test_truncated_completions():
    ids = torch.tensor([[5, 6, 1, 0], [5, 6, 7, 8], [5, 9, 0, 0], [7, 7, 7, 7], [5, 5, 5, 5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    texts = ["", "", "", "", "xx STOP"]
    got = truncated_completions(ids, mask, stop_ids=[1, 9], texts=texts, stop_strings=["STOP"])
    # ends on eos; runs out; ends on stop id 9; runs out; runs out but holds a stop string
    assert got.tolist() == [False, True, False, True, False]
    got = truncated_completions(ids, mask, stop_ids=[1, 9])
    assert got.tolist() == [False, True, False, True, True]
    masked = mask_truncated(mask, got)
    assert masked.dtype == mask.dtype and masked.sum(1).tolist() == [3, 0, 2, 0, 0]


# ----------------------------------------------------------------------------- micro-batches (unit)


@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("level, is_mode", [("token", None), ("sequence", None), ("token", "token_truncate"),
                                            ("token", "sequence_mask"), ("sequence", "token_mask"),
                                            ("sequence", "sequence_truncate")])
def test_micro_batches_sum_to_the_whole_batch(loss_type, level, is_mode):
    """Rows split 2 + 3 + 1 (the rollout correction computed per micro-batch from its own rows):
    the losses and gradients add up to the whole batch's; the metrics combine to its metrics."""
    g = torch.Generator().manual_seed(11)
    B, T = 6, 10
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    samp = old + 0.4 * torch.randn(B, T, generator=g)
    adv, mask = torch.randn(B, generator=g), (torch.rand(B, T, generator=g) > 0.3).float()
    n_items = mask.sum()
    kw = dict(loss_type=loss_type, beta=0.03, epsilon_low=0.2, epsilon_high=1.5 if loss_type == "cispo" else 0.28,
              max_completion_length=12, importance_sampling_level=level, use_bias_correction_kl=True,
              sampling=samp if is_mode else None, is_mode=is_mode or "sequence_mask", is_clip_min=0.6,
              is_clip_max=1.5)

    def run(cuts):
        x = logp.clone().requires_grad_(True)
        total, acc = 0.0, {}
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            sl = slice(lo, hi)
            loss, m = micro_batch_loss(x[sl], old, ref, adv, mask, n_items, sl, **kw)
            loss.backward()
            total = total + loss.detach()
            combine_metrics(acc, m, mask[sl].sum() / n_items)
        return total, x.grad, acc

    whole, g_whole, m_whole = run([0, B])
    micro, g_micro, m_micro = run([0, 2, 5, 6])
    torch.testing.assert_close(micro, whole, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_micro, g_whole, rtol=1e-5, atol=1e-8)
    assert m_micro.keys() == m_whole.keys()
    assert ("sampling/importance_sampling_ratio/min" in m_whole) == bool(is_mode)
    for k in m_whole:
        torch.testing.assert_close(m_micro[k], m_whole[k], rtol=1e-5, atol=1e-7, msg=k)


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("override, needle", [
    (["loss.loss_type=cispo"], "'loss.epsilon_high' caps CISPO's importance weight"),
    (["loss.importance_sampling_level=sentence"], "'loss.importance_sampling_level' must be one of token, sequence"),
    (["loss.importance_sampling_mode=token"], "'loss.importance_sampling_mode' must be one of token_truncate"),
    (["loss.importance_sampling_clip_max=0"], "'loss.importance_sampling_clip_max' must be > 0 or null"),
    (["loss.importance_sampling_clip_min=-1"], "'loss.importance_sampling_clip_min' must be >= 0 or null"),
    (["loss.importance_sampling_clip_min=5"], "must be < loss.importance_sampling_clip_max (got 5.0 >= 3.0)"),
    (["loss.importance_sampling_correction=true", "loss.importance_sampling_mode=sequence_truncate",
      "loss.importance_sampling_clip_max=null"], "sequence_truncate needs a bound"),
    (["loss.mask_truncated_completions=sometimes"], "'loss.mask_truncated_completions' must be true/false"),
])
def test_loss_option_errors_are_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_loss_options_round_trip():
    c = load_config(None, ["loss.loss_type=cispo", "loss.epsilon_high=5", "loss.importance_sampling_level=sequence",
                           "loss.importance_sampling_correction=true", "loss.importance_sampling_mode=token_mask",
                           "loss.importance_sampling_clip_min=0.5", "loss.mask_truncated_completions=true",
                           "loss.use_bias_correction_kl=true"])
    assert c.loss.importance_sampling_clip_min == 0.5 and c.loss.importance_sampling_clip_max == 3.0
    assert type(c).from_dict(c.to_dict()) == c


# ------------------------------------------------------------------------------------------ trainer


def _config(tmp_path, name, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path / name}", "run.max_steps=1", "data.prompts_per_step=2",
                              "generation.num_generations=4", "optim.lr=0.01", *overrides],
                       base=default_config("tiny"))


def _one_step(tmp_path, name, *overrides):
    trainer = GRPOTrainer(_config(tmp_path, name, *overrides), progress=False)
    try:
        rec = trainer.train_step(1)
        lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return rec, lora
    finally:
        trainer.close()


#: Stop tokens that end about a third of the tiny preset's 8-token completions early.
STOPS = "generation.stop_token_ids=[" + ", ".join(str(i) for i in range(3, 128, 4)) + "]"


@pytest.mark.parametrize("overrides", [
    ("loss.loss_type=cispo", "loss.epsilon_high=1.05", "loss.beta=0.05", "loss.use_bias_correction_kl=true"),
    ("loss.importance_sampling_level=sequence", "loss.beta=0.05", "loss.num_iterations=2"),
    ("loss.loss_type=bnpo", "loss.importance_sampling_correction=true", "generation.top_k=20",
     "loss.importance_sampling_mode=token_truncate", "loss.importance_sampling_clip_min=0.5"),
    ("loss.loss_type=dapo", "loss.mask_truncated_completions=true", STOPS, "loss.importance_sampling_correction=true",
     "loss.importance_sampling_mode=sequence_mask", "loss.importance_sampling_clip_max=1.0001",
     "generation.top_p=0.9"),
], ids=["cispo", "gspo", "is-token", "truncated-is-seq"])
def test_trainer_micro_batches_equal_the_whole_batch(tmp_path, overrides):
    """A whole GRPO step, whole batch against micro-batches of 3 + 3 + 2 sequences, with each new
    option on: the same loss, metrics and update."""
    whole, w_lora = _one_step(tmp_path, "whole", *overrides)
    micro, m_lora = _one_step(tmp_path, "micro", *overrides, "optim.micro_batch_size=3")
    keys = [k for k in whole if k.startswith(("loss", "kl", "grad_norm", "clip_ratio", "cispo", "sampling/",
                                              "completions/"))]
    assert {"loss", "kl", "grad_norm"} <= set(keys)
    for k in keys:
        assert micro[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-6), k
    for n in w_lora:
        torch.testing.assert_close(m_lora[n], w_lora[n], atol=5e-4, rtol=1e-3)
    if "loss.importance_sampling_correction=true" in overrides:  # a filtered sampler: weights below 1
        assert whole["sampling/importance_sampling_ratio/min"] < 1.0
    if "loss.mask_truncated_completions=true" in overrides:
        assert 0.0 < whole["completions/clipped_ratio"] < 1.0


def test_mask_truncated_completions_in_the_trainer(tmp_path):
    """Every completion of the tiny preset runs to max_completion_len without stop tokens: all are
    dropped (no gradient, loss 0); with the option off they train."""
    rec, lora = _one_step(tmp_path, "masked", "loss.mask_truncated_completions=true")
    assert rec["completions/clipped_ratio"] == 1.0 and rec["loss"] == 0.0 and rec["grad_norm"] == 0.0
    rec_off, lora_off = _one_step(tmp_path, "unmasked")
    # logged either way, as TRL does; only the loss ignores it when the option is off
    assert rec_off["completions/clipped_ratio"] == 1.0 and rec_off["grad_norm"] > 0
    assert any(not torch.equal(lora[n], lora_off[n]) for n in lora)

"""GRPO loss: the fused Triton kernel (interpreter on CPU) against the plain-PyTorch reference, the
reference against hand-computed values, and log-probs + loss end to end."""

from __future__ import annotations

import pytest
import torch

from compilepass.kernels import dispatch
from compilepass.kernels._triton_support import triton_available
from compilepass.kernels.grpo_loss import LOSS_TYPES, grpo_loss_reference, grpo_loss_triton
from compilepass.kernels.logprobs import selective_log_softmax_reference, selective_log_softmax_triton

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

METRIC_KEYS = {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}


def _batch(B, T, *, seed=0, off_policy=True, masked_rows=(), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 4
    # Large enough log-ratio noise that both clip sides trigger.
    old = logp + 0.4 * torch.randn(B, T, generator=g) if off_policy else None
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    for r in masked_rows:
        mask[r] = 0
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return logp.to(device), mv(old), ref.to(device), adv.to(device), mask.to(device)


def _run(fn, logp, *args, scale=1.0, **kw):
    x = logp.clone().requires_grad_(True)
    loss, metrics = fn(x, *args, **kw)
    (loss * scale).backward()
    return loss.detach(), metrics, x.grad


@needs_triton
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_triton_matches_reference(loss_type, beta, off_policy):
    logp, old, ref, adv, mask = _batch(6, 45, seed=1, off_policy=off_policy, masked_rows=(2,))
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, beta=beta, loss_type=loss_type)
    if loss_type == "dr_grpo":
        kw["max_completion_length"] = 64
    if loss_type == "dapo":
        kw["num_items_in_batch"] = 500
    l_ref, m_ref, g_ref = _run(grpo_loss_reference, logp, old, ref, adv, mask, scale=1.7, **kw)
    l_tri, m_tri, g_tri = _run(grpo_loss_triton, logp, old, ref, adv, mask, scale=1.7, **kw)
    torch.testing.assert_close(l_tri, l_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_tri, g_ref, rtol=1e-5, atol=1e-8)
    clip_keys = {"cispo_clip_ratio"} if loss_type == "cispo" else METRIC_KEYS
    assert set(m_tri) == set(m_ref) == (clip_keys | ({"kl"} if beta > 0 else set()))
    for k in m_ref:
        torch.testing.assert_close(m_tri[k], m_ref[k], rtol=1e-5, atol=1e-7)
        assert not m_tri[k].requires_grad
    if off_policy and loss_type == "cispo":  # the cap (here 0.28) binds
        assert m_ref["cispo_clip_ratio"] > 0
    elif off_policy:  # the case really clips on both sides
        assert m_ref["clip_ratio/low_mean"] > 0 and m_ref["clip_ratio/high_mean"] > 0
        if beta == 0 and loss_type != "cispo":  # (CISPO's capped tokens keep a gradient)
            assert (g_ref == 0).sum() > (mask == 0).sum()  # clipped tokens get no gradient
    assert g_ref[2].abs().sum() == 0  # fully masked row


@needs_triton
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fully_masked_batch_and_single_token(loss_type):
    for B, T in ((1, 1), (3, 5)):
        logp, old, ref, adv, mask = _batch(B, T, seed=2)
        mask.zero_()
        for fn in (grpo_loss_reference, grpo_loss_triton):
            loss, metrics, grad = _run(fn, logp, old, ref, adv, mask, beta=0.1, loss_type=loss_type)
            assert torch.isfinite(loss) and loss.item() == 0.0
            assert all(torch.isfinite(v) for v in metrics.values())
            assert torch.count_nonzero(grad) == 0
    # batch of one sequence with one token, unmasked
    logp, old, ref, adv, mask = _batch(1, 1, seed=3)
    mask.fill_(1)
    a = _run(grpo_loss_reference, logp, old, ref, adv, mask, beta=0.1, loss_type=loss_type)
    b = _run(grpo_loss_triton, logp, old, ref, adv, mask, beta=0.1, loss_type=loss_type)
    torch.testing.assert_close(b[0], a[0])
    torch.testing.assert_close(b[2], a[2])


def test_reference_against_hand_computed_values():
    # B=2, T=2; sequence 0: A=+1, tokens with ratios 1.5 (clipped high) and 1.0; sequence 1: A=-1,
    # ratio 0.5 (clipped low), second token masked.
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    tok = torch.tensor([[-1.2, -1.0], [0.8, 0.0]])  # -min(r A, clip(r) A), eps 0.2
    expected = {
        "grpo": ((tok[0].sum() / 2) + (tok[1].sum() / 1)) / 2,
        "bnpo": tok.sum() / 3,
        "dr_grpo": tok.sum() / (2 * 10),
        "dapo": tok.sum() / 7,
    }
    for loss_type, value in expected.items():
        loss, metrics = grpo_loss_reference(logp, old, None, adv, mask, loss_type=loss_type,
                                            max_completion_length=10, num_items_in_batch=7)
        torch.testing.assert_close(loss, value)
        torch.testing.assert_close(metrics["clip_ratio/high_mean"], torch.tensor(1 / 3))
        torch.testing.assert_close(metrics["clip_ratio/low_mean"], torch.tensor(1 / 3))
        torch.testing.assert_close(metrics["clip_ratio/region_mean"], torch.tensor(2 / 3))
    # k3 KL: ref = logp + log 2 -> exp(log 2) - log 2 - 1 per token
    loss0, _ = grpo_loss_reference(logp, old, None, adv, mask, loss_type="bnpo")
    loss1, m = grpo_loss_reference(logp, old, logp + 0.6931471805599453, adv, mask, beta=0.5, loss_type="bnpo")
    k3 = 2 - 0.6931471805599453 - 1
    torch.testing.assert_close(loss1 - loss0, torch.tensor(0.5 * k3))
    torch.testing.assert_close(m["kl"], torch.tensor(k3))


def test_on_policy_gradient_is_minus_advantage():
    # old = logp.detach(): ratio 1, d loss / d logp = -A * w for every unmasked token (bnpo: w = 1/N)
    logp, _, _, adv, mask = _batch(4, 9, seed=4)
    loss, _, grad = _run(grpo_loss_reference, logp, None, None, adv, mask, loss_type="bnpo")
    expected = -adv[:, None] * mask / mask.sum()
    torch.testing.assert_close(grad, expected)


@needs_triton
def test_num_items_in_batch_as_tensor_and_int_agree():
    logp, old, ref, adv, mask = _batch(3, 8, seed=5)
    a = grpo_loss_triton(logp, old, ref, adv, mask, loss_type="dapo", num_items_in_batch=40)[0]
    b = grpo_loss_triton(logp, old, ref, adv, mask, loss_type="dapo", num_items_in_batch=torch.tensor(40))[0]
    c = grpo_loss_reference(logp, old, ref, adv, mask, loss_type="dapo", num_items_in_batch=40)[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


@needs_triton
def test_triton_under_no_grad_matches_and_needs_no_graph():
    logp, old, ref, adv, mask = _batch(3, 10, seed=9)
    x = logp.clone().requires_grad_(True)
    with torch.no_grad():
        loss, metrics = grpo_loss_triton(x, old, ref, adv, mask, beta=0.04)
    expected, m_ref = grpo_loss_reference(logp, old, ref, adv, mask, beta=0.04)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["kl"], m_ref["kl"])


@pytest.mark.parametrize("fn", [grpo_loss_reference, grpo_loss_triton])
def test_invalid_arguments(fn):
    if fn is grpo_loss_triton and not triton_available():
        pytest.skip("triton is not importable")
    logp, old, ref, adv, mask = _batch(2, 3)
    with pytest.raises(ValueError, match="loss_type"):
        fn(logp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logp"):
        fn(logp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="shape"):
        fn(logp, old[:, :2], ref, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        fn(logp, old, ref, adv[:1], mask)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_loss_end_to_end(dtype):
    """Triton log-probs + Triton loss vs reference + reference, gradient into hidden (LoRA: frozen head)."""
    g = torch.Generator().manual_seed(6)
    B, T, H, V = 2, 7, 32, 90
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    adv = torch.tensor([0.7, -1.1])
    ref = -torch.rand(B, T, generator=g) * 5

    def run(lp_fn, loss_fn, h, w):
        h = h.clone().requires_grad_(True)
        logp = lp_fn(h, w, ids, 0.8)
        loss, metrics = loss_fn(logp, logp.detach() + 0.05, ref, adv, mask, beta=0.04, loss_type="grpo")
        loss.backward()
        return loss.detach(), h.grad, w.grad

    # oracle: float32 reference on the upcast inputs
    l_ref, g_ref, w_ref = run(selective_log_softmax_reference, grpo_loss_reference, hidden.float(), weight.float())
    l_tri, g_tri, w_tri = run(selective_log_softmax_triton, grpo_loss_triton, hidden, weight)
    assert w_ref is None and w_tri is None
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(l_tri.item() - l_ref.item()) <= tol * max(1.0, abs(l_ref.item()))
    err = ((g_tri.float() - g_ref).abs().max() / g_ref.abs().max()).item()
    assert err < (1e-4 if dtype == torch.float32 else 2e-2)


def test_dispatch_picks_backend_and_env_forces_it(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.backend_for(x) == "chunked"  # CPU
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.backend_for(x) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.backend_for(x)
    if triton_available():
        monkeypatch.setenv(dispatch.ENV_VAR, "triton")
        assert dispatch.backend_for(x) == "triton"


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
def test_dispatch_functions_agree(monkeypatch, backend):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not importable")
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g)
    ids = torch.randint(0, 40, (2, 5), generator=g)
    logp = dispatch.selective_log_softmax(hidden, weight, ids, 1.1)
    expected = selective_log_softmax_reference(hidden.detach(), weight, ids, 1.1)
    torch.testing.assert_close(logp.detach(), expected, rtol=1e-4, atol=1e-5)
    loss, metrics = dispatch.grpo_loss(logp, None, None, torch.tensor([1.0, -1.0]), torch.ones(2, 5))
    loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert set(metrics) == METRIC_KEYS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_triton_cuda_matches_reference(loss_type):
    logp, old, ref, adv, mask = _batch(16, 1000, seed=8, masked_rows=(3,), device="cuda")
    kw = dict(beta=0.04, loss_type=loss_type, epsilon_high=0.28)
    l_ref, m_ref, g_ref = _run(grpo_loss_reference, logp, old, ref, adv, mask, **kw)
    l_tri, m_tri, g_tri = _run(grpo_loss_triton, logp, old, ref, adv, mask, **kw)
    torch.testing.assert_close(l_tri, l_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_tri, g_ref, rtol=1e-5, atol=1e-9)
    for k in m_ref:
        torch.testing.assert_close(m_tri[k], m_ref[k], rtol=1e-5, atol=1e-7)

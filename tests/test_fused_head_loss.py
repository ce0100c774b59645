"""fused_head_grpo_loss (the loss and its gradients in the forward, three GEMMs) against the materialized
composition: selective_log_softmax_reference then grpo_loss_reference, autograd through both."""

from __future__ import annotations

import pytest
import torch

from compilepass.kernels.fused_head_loss import fused_head_grpo_loss
from compilepass.kernels.grpo_loss import LOSS_TYPES, grpo_loss_reference
from compilepass.kernels.logprobs import selective_log_softmax_reference


def _case(dtype=torch.float32, B=3, T=7, H=24, V=101, seed=0, head_grad=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_(head_grad)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        logp0 = selective_log_softmax_reference(hidden.float(), weight.float(), ids, 0.8)
    old = logp0 + 0.3 * torch.randn(B, T, generator=g)  # ratios on both sides of the clip range
    ref = logp0 + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.tensor([1.0, -0.7, 0.4, -0.2])[:B]
    isw = 0.5 + torch.rand(B, T, generator=g)
    return hidden, weight, ids, old, ref, adv, mask, isw


def _reference(hidden, weight, ids, temperature, *args, **kw):
    logp = selective_log_softmax_reference(hidden, weight, ids, temperature)
    loss, _ = grpo_loss_reference(logp, *args, **kw)
    return loss, logp


def _grads(fn, hidden, weight, *args, **kw):
    for t in (hidden, weight):
        t.grad = None
    loss, logp = fn(hidden, weight, *args, **kw)
    (loss * 1.7).backward()  # an upstream gradient other than 1 reaches the stored gradients
    return loss.detach(), logp.detach(), hidden.grad.clone(), None if weight.grad is None else weight.grad.clone()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,bias_kl,with_isw", [(0.0, False, False), (0.04, False, True), (0.04, True, False)],
                         ids=["plain", "kl+isw", "bias-corrected-kl"])
def test_loss_and_gradients_equal_the_materialized_composition(loss_type, beta, bias_kl, with_isw, impl):
    """Both implementations of the passes over the logits buffer (the Triton kernels run in Triton's
    interpreter here), several chunks, a head that trains."""
    hidden, weight, ids, old, ref, adv, mask, isw = _case()
    kw = dict(epsilon_low=0.2, epsilon_high=0.28 if loss_type != "cispo" else 4.0, beta=beta, loss_type=loss_type,
              max_completion_length=9, num_items_in_batch=11 if loss_type in ("dapo", "cispo") else None,
              is_weight=isw if with_isw else None, use_bias_correction_kl=bias_kl)
    args = (ids, 0.8, old, ref if beta > 0 else None, adv, mask)
    want = _grads(_reference, hidden, weight, *args, **kw)
    got = _grads(fused_head_grpo_loss, hidden, weight, *args, chunk_bytes=4 * 101 * 5, impl=impl, **kw)  # 5 a chunk
    for a, b, name in zip(got, want, ("loss", "logp", "d_hidden", "d_weight")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_on_policy_frozen_head_and_bf16():
    hidden, weight, ids, _, _, adv, mask, _ = _case(head_grad=False)
    want = _grads(_reference, hidden, weight, ids, 1.0, None, None, adv, mask)
    got = _grads(fused_head_grpo_loss, hidden, weight, ids, 1.0, None, None, adv, mask)
    assert got[3] is None  # a frozen head: no weight gradient computed
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    hidden, weight, ids, old, _, adv, mask, _ = _case(torch.bfloat16, seed=3)
    want = _grads(_reference, hidden, weight, ids, 0.7, old, None, adv, mask)
    got = _grads(fused_head_grpo_loss, hidden, weight, ids, 0.7, old, None, adv, mask)
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-3)
    for a, b in zip(got[2:], want[2:]):  # both round D (or the logits' gradient) to bf16 on the way
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < 3e-2


def test_triton_passes_handle_temperature_ragged_tiles_and_extreme_logits():
    """The Triton row statistics and logit gradient against PyTorch's ops: a vocab that no tile divides,
    rows past the last tile, a temperature, a target at the last column, and one logit per row in the
    hundreds (every other column's exp underflows)."""
    hidden, weight, ids, old, _, adv, mask, _ = _case(B=3, T=5, H=16, V=203, seed=9)
    with torch.no_grad():
        weight[7] = 400.0 * weight[7]  # one huge logit per row: exp underflows for every other column
    ids[0, 0] = 202
    ids[2, 1] = 7
    for t in (1.0, 0.6):
        want = _grads(fused_head_grpo_loss, hidden, weight, ids, t, old, None, adv, mask, impl="torch")
        got = _grads(fused_head_grpo_loss, hidden, weight, ids, t, old, None, adv, mask, impl="triton",
                     chunk_bytes=4 * 203 * 7)  # 7 rows a chunk: a ragged last chunk of row tiles of 2
        for a, b, name in zip(got, want, ("loss", "logp", "d_hidden", "d_weight")):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} at T={t}")
            assert torch.isfinite(a).all()


@pytest.mark.parametrize("forced, triton_runs", [("triton", True), ("chunked", False), ("reference", False)])
def test_auto_follows_compilepass_kernels(monkeypatch, forced, triton_runs):
    """impl="auto" picks the passes COMPILEPASS_KERNELS names (as every other kernel entry point does)."""
    import compilepass.kernels.fused_head_loss as fhl

    calls = []
    original = fhl._triton_row_stats
    monkeypatch.setattr(fhl, "_triton_row_stats", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("COMPILEPASS_KERNELS", forced)
    hidden, weight, ids, old, _, adv, mask, _ = _case()
    got = _grads(fused_head_grpo_loss, hidden, weight, ids, 1.0, old, None, adv, mask)
    assert bool(calls) is triton_runs
    want = _grads(_reference, hidden, weight, ids, 1.0, old, None, adv, mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_impl_is_refused():
    hidden, weight, ids, old, _, adv, mask, _ = _case()
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_head_grpo_loss(hidden, weight, ids, 1.0, old, None, adv, mask, impl="cuda")


def test_sequence_level_weights_and_bad_shapes_are_refused():
    hidden, weight, ids, old, _, adv, mask, _ = _case()
    with pytest.raises(ValueError, match="token-level importance weights"):
        fused_head_grpo_loss(hidden, weight, ids, 1.0, old, None, adv, mask, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, H\]"):
        fused_head_grpo_loss(hidden[0], weight, ids, 1.0, old, None, adv, mask)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused_head_grpo_loss(hidden, weight, ids, 0.0, old, None, adv, mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the bf16 GEMMs with float32 output on the GPU")
def test_cuda_bf16_trained_head_against_a_float64_oracle():
    """On the GPU (the bench's path): bf16 hidden and head, several chunks, the float32-out logits GEMM;
    the loss and both gradients against the composition in float64 of the same bf16 inputs."""
    hidden, weight, ids, old, ref, adv, mask, _ = _case(torch.bfloat16, B=4, T=96, H=256, V=4099, seed=5)
    dev = torch.device("cuda")
    h = hidden.detach().to(dev).requires_grad_(True)
    w = weight.detach().to(dev).requires_grad_(True)
    args = [t.to(dev) for t in (ids,)] + [0.9] + [t.to(dev) for t in (old, ref, adv, mask)]
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.04, loss_type="dapo", num_items_in_batch=300)
    got = _grads(fused_head_grpo_loss, h, w, *args, chunk_bytes=4 * 4099 * 64, **kw)  # 64 tokens a chunk
    h64 = hidden.detach().double().to(dev).requires_grad_(True)
    w64 = weight.detach().double().to(dev).requires_grad_(True)
    args64 = [args[0], 0.9] + [t.double() for t in args[2:]]
    want = _grads(_reference, h64, w64, *args64, **kw)
    assert abs(got[0].item() - want[0].item()) <= 1e-3 * max(1.0, abs(want[0].item()))
    torch.testing.assert_close(got[1].double(), want[1].double(), rtol=0, atol=2e-2)  # log-probs of bf16-rounded logits
    for a, b in zip(got[2:], want[2:]):
        assert a.dtype == torch.bfloat16
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 2e-2


def _sm90_tools():
    from test_kernels_logprobs import _ptxas_tools

    return _ptxas_tools()


@pytest.mark.skipif(_sm90_tools() is None, reason="no triton ptxas/cuobjdump, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("which", ["row_stats", "logit_grad"])
def test_triton_passes_compile_for_sm90_without_spills(which):
    """Both kernels at the tile sizes and warps the GPU launches use (fused_head_loss._triton_*)."""
    import inspect

    from test_kernels_logprobs import _aot_compile_sm90

    from compilepass.kernels import _fused_head_triton as k

    fn = k.row_stats_kernel if which == "row_stats" else k.logit_grad_kernel
    consts = dict(BLOCK_R=4, BLOCK_V=2048 if which == "row_stats" else 1024)
    sig = {}
    for name in inspect.signature(fn).parameters:
        sig[name] = ("constexpr" if name in consts else "*i64" if name == "ids_ptr" else "*bf16" if name == "d_ptr"
                     else "*fp32" if name.endswith("_ptr") else "fp32" if name == "inv_t" else "i32")
    divisible = {n for n in sig if n.endswith("_ptr")}
    compiled, local = _aot_compile_sm90(fn, sig, consts, divisible, 8 if which == "row_stats" else 4, 1)
    assert local == 0, "register spills to local memory"
    assert "ex2.approx" in compiled.asm["ptx"]  # the exponentials on the SFU, not a library call

"""Selective log-softmax: Triton (interpreter on CPU, compiled on CUDA) and chunked PyTorch vs the reference.

The Triton kernels run on CPU through the Triton interpreter; ``compilepass.kernels`` builds
interpreted kernels for CPU tensors itself, so this works whether or not ``TRITON_INTERPRET=1`` was
set and whether or not triton was imported earlier in the process.

Tolerances: the oracle is the float32 reference on the (upcast) inputs. fp32 inputs: rtol 1e-4.
bf16 inputs: log-probs within 2e-3 absolute (the kernels accumulate in fp32 and never round logits
to bf16), gradients within 2e-2 of the largest gradient entry (P, the gradient basis and the
results are rounded to bf16 on the way).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch

from compilepass.kernels import logprobs as lp_mod
from compilepass.kernels._triton_support import TileConfig, triton_available
from compilepass.kernels.logprobs import (
    selective_log_softmax_chunked,
    selective_log_softmax_reference,
    selective_log_softmax_triton,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")

# The Triton interpreter turns 1-element numpy arrays into Python ints (numpy >= 1.25 warns).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = torch.device("cpu")


def _make(n_lead, hdim, vocab, dtype, *, weight_grad, seed=0, device=DEVICE, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_lead, hdim, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hdim, generator=g) * (scale / hdim**0.5)).to(device=device, dtype=dtype)
    weight.requires_grad_(weight_grad)
    ids = torch.randint(0, vocab, tuple(n_lead), generator=g).to(device)
    upstream = torch.randn(*n_lead, generator=g).to(device)
    return hidden, weight, ids, upstream


def _oracle(hidden, weight, ids, temperature, upstream):
    h = hidden.detach().float().requires_grad_(True)
    w = weight.detach().float().requires_grad_(True)
    out = selective_log_softmax_reference(h, w, ids, temperature)
    out.backward(upstream)
    return out.detach(), h.grad, w.grad


def _rel_max_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


def _check(impl, hidden, weight, ids, upstream, temperature, dtype, **kw):
    ref_out, ref_dh, ref_dw = _oracle(hidden, weight, ids, temperature, upstream)
    out = impl(hidden, weight, ids, temperature, **kw)
    assert out.dtype == torch.float32
    assert out.shape == ids.shape
    out.backward(upstream)
    assert hidden.grad is not None and hidden.grad.dtype == hidden.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out.detach(), ref_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hidden.grad, ref_dh, rtol=1e-4, atol=1e-5 * ref_dh.abs().max().item())
    else:
        assert (out.detach() - ref_out).abs().max().item() < 2e-3
        assert _rel_max_err(hidden.grad, ref_dh) < 2e-2
    if weight.requires_grad:
        assert weight.grad is not None and weight.grad.dtype == weight.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(weight.grad, ref_dw, rtol=1e-4, atol=1e-5 * ref_dw.abs().max().item())
        else:
            assert _rel_max_err(weight.grad, ref_dw) < 2e-2
    else:
        assert weight.grad is None


# (leading shape, hidden, vocab): vocab not a multiple of the interpreter's BLOCK_N=32, a single
# token, hidden not a multiple of BLOCK_K=16 (masked K loop) and not a power of two.
SHAPES = [
    ((2, 19), 48, 100),
    ((1,), 40, 77),
    ((37,), 24, 129),
]


@needs_triton
@pytest.mark.parametrize("lead,hdim,vocab", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_triton_matches_reference(lead, hdim, vocab, dtype, weight_grad):
    hidden, weight, ids, up = _make(lead, hdim, vocab, dtype, weight_grad=weight_grad)
    temperature = 0.7 if weight_grad else 1.0
    # Small chunks so that several token and vocab chunks (online rescaling) are exercised.
    _check(selective_log_softmax_triton, hidden, weight, ids, up, temperature, dtype,
           token_chunk=16, vocab_chunk=64, chunk_bytes=16 * 64 * weight.element_size())


def _entropy_oracle(hidden, weight, temperature, logits_in_input_dtype=False):
    """float64 entropy of softmax(hidden @ weight.T / T) on the (upcast) inputs; or of the logits as
    a matmul in the inputs' dtype gives them (what the reference and the chunked version softmax)."""
    h, w = hidden.detach(), weight.detach()
    z = (h @ w.t()).double() if logits_in_input_dtype else h.double() @ w.double().t()
    z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1).float()


ENTROPY_IMPLS = {
    "reference": lambda h, w, i, t, **kw: selective_log_softmax_reference(h, w, i, t, return_entropy=True),
    "chunked": lambda h, w, i, t, **kw: selective_log_softmax_chunked(h, w, i, t, chunk_size=7, return_entropy=True),
    "triton": lambda h, w, i, t, **kw: selective_log_softmax_triton(h, w, i, t, return_entropy=True, **kw),
}


@pytest.mark.parametrize("impl", list(ENTROPY_IMPLS))
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_the_same_pass_matches_the_softmax_entropy(impl, grad, dtype):
    if impl == "triton" and not triton_available():
        pytest.skip("triton is not importable")
    hidden, weight, ids, up = _make((3, 13), 40, 203, dtype, weight_grad=False, seed=7)
    # small chunks: several token chunks, vocab chunks and tiles are combined (the chain rule)
    kw = dict(token_chunk=16, vocab_chunk=64, lse_buffer_bytes=4 * 7 * 10) if impl == "triton" else {}
    with torch.set_grad_enabled(grad):
        logp, entropy = ENTROPY_IMPLS[impl](hidden, weight, ids, 0.8, **kw)
    assert entropy.shape == ids.shape and entropy.dtype == torch.float32 and not entropy.requires_grad
    assert logp.requires_grad == grad
    # the Triton kernel never rounds logits to the inputs' dtype; the two PyTorch versions do
    expect = _entropy_oracle(hidden, weight, 0.8, logits_in_input_dtype=impl != "triton")
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(entropy, expect, rtol=tol, atol=tol)
    if grad:  # the log-probs and their gradients are the ones without return_entropy
        logp.backward(up)
        dh = hidden.grad.clone()
        hidden.grad = None
        plain = {"reference": selective_log_softmax_reference, "chunked": selective_log_softmax_chunked,
                 "triton": selective_log_softmax_triton}[impl]
        same_chunks = {"triton": {"token_chunk": 16, "vocab_chunk": 64}, "chunked": {"chunk_size": 7}}
        plain_logp = plain(hidden, weight, ids, 0.8, **same_chunks.get(impl, {}))
        torch.testing.assert_close(logp.detach(), plain_logp.detach(), rtol=0, atol=0)
        plain_logp.backward(up)
        torch.testing.assert_close(dh, hidden.grad, rtol=0, atol=0)


@pytest.mark.parametrize("impl", list(ENTROPY_IMPLS))
def test_entropy_of_a_confident_row_is_small_and_not_a_cancellation(impl):
    """Logits near 40 apart: the entropy is ~1e-15; written as lse - E[s] it would be float32 noise
    of ~1e-6 (two numbers near 40). The kernels sum non-negative terms instead."""
    if impl == "triton" and not triton_available():
        pytest.skip("triton is not importable")
    vocab, hdim = 150, 8
    weight = torch.zeros(vocab, hdim)
    weight[:, 0] = -1.0
    weight[5, 0] = 39.0  # token 5's logit 39, every other -1
    hidden = torch.zeros(4, hdim)
    hidden[:, 0] = 1.0
    ids = torch.tensor([5, 5, 0, 1])
    with torch.no_grad():
        _, entropy = ENTROPY_IMPLS[impl](hidden, weight, ids, 1.0)
    expect = _entropy_oracle(hidden, weight, 1.0)
    assert expect.max().item() < 1e-12
    assert entropy.max().item() < 1e-12 and entropy.min().item() >= 0.0


@needs_triton
def test_entropy_with_no_tokens():
    weight = torch.randn(50, 16)
    hidden = torch.zeros(0, 16, requires_grad=True)
    logp, entropy = selective_log_softmax_triton(hidden, weight, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert logp.shape == entropy.shape == (0,)
    logp.sum().backward()


@needs_triton
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.5])
def test_triton_temperature_and_default_chunks(temperature):
    hidden, weight, ids, up = _make((3, 11), 32, 150, torch.float32, weight_grad=True, seed=1)
    _check(selective_log_softmax_triton, hidden, weight, ids, up, temperature, torch.float32)


@needs_triton
def test_triton_forward_without_grad_uses_lse_path_in_chunks():
    hidden, weight, ids, _ = _make((45,), 32, 200, torch.float32, weight_grad=False, seed=2)
    ref = selective_log_softmax_reference(hidden.detach(), weight, ids, 0.9)
    with torch.no_grad():
        # 7 tiles of 32 vocab ids -> 28 bytes per row: 10 rows per chunk, 5 chunks
        out = selective_log_softmax_triton(hidden, weight, ids, 0.9, lse_buffer_bytes=280)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not out.requires_grad


@needs_triton
def test_triton_no_grad_forward_skips_gradient_work(monkeypatch):
    # Under torch.no_grad() autograd still reports needs_input_grad=True inside Function.forward;
    # the forward must look at grad mode itself and take the cheap path.
    hidden, weight, ids, _ = _make((12,), 16, 50, torch.float32, weight_grad=True, seed=12)

    def forbidden(*args, **kwargs):
        raise AssertionError("gradient basis computed under no_grad")

    monkeypatch.setattr(lp_mod, "_forward_with_grad_basis", forbidden)
    with torch.no_grad():
        out = selective_log_softmax_triton(hidden, weight, ids)
    torch.testing.assert_close(out, selective_log_softmax_reference(hidden.detach(), weight.detach(), ids),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError, match="gradient basis"):
        selective_log_softmax_triton(hidden, weight, ids)  # grad mode on: the basis is needed


@needs_triton
def test_triton_weight_grad_only_and_token_chunked_weight_grad():
    # hidden does not need grad -> no gradient basis; many tokens per vocab chunk budget -> the
    # token-chunked fp32-accumulated weight-gradient path.
    hidden, weight, ids, up = _make((40,), 24, 90, torch.float32, weight_grad=True, seed=3)
    hidden.requires_grad_(False)
    ref_out, _, ref_dw = _oracle(hidden, weight, ids, 1.0, up)
    # 3600 bytes: D holds 10 tokens x 90 vocab fp32 -> 4 token chunks accumulated in fp32
    out = selective_log_softmax_triton(hidden, weight, ids, 1.0, chunk_bytes=3600)
    out.backward(up)
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad, ref_dw, rtol=1e-4, atol=1e-5 * ref_dw.abs().max().item())


@needs_triton
def test_triton_explicit_tile_config():
    hidden, weight, ids, up = _make((21,), 32, 70, torch.float32, weight_grad=True, seed=4)
    cfg = TileConfig(block_m=16, block_n=16, block_k=32, group_m=1)
    _check(selective_log_softmax_triton, hidden, weight, ids, up, 1.0, torch.float32, config=cfg)


@needs_triton
def test_triton_mixed_dtypes_hidden_fp32_weight_bf16():
    hidden, weight, ids, up = _make((9,), 32, 50, torch.float32, weight_grad=False, seed=5)
    weight = weight.detach().to(torch.bfloat16)
    ref_out, ref_dh, _ = _oracle(hidden.detach().to(torch.bfloat16), weight, ids, 1.0, up)
    out = selective_log_softmax_triton(hidden, weight, ids, 1.0)
    out.backward(up)
    assert hidden.grad.dtype == torch.float32
    assert (out.detach() - ref_out).abs().max().item() < 2e-3
    assert _rel_max_err(hidden.grad, ref_dh) < 2e-2


@needs_triton
def test_triton_confident_model_gradient_is_accurate():
    # p(target) ~ 1: dlogp/dh = (1 - p_t) W_t - sum_{v != t} p_v W_v is tiny; computed naively as
    # W_t - E[W] in bf16 it would be mostly rounding error.
    hidden, weight, ids, up = _make((8,), 32, 60, torch.bfloat16, weight_grad=False, seed=6)
    with torch.no_grad():
        hidden.copy_((weight[ids].float() * 8.0).to(torch.bfloat16))
    ref_out, ref_dh, _ = _oracle(hidden, weight, ids, 1.0, up)
    assert ref_out.max().item() > -1e-2  # really confident
    out = selective_log_softmax_triton(hidden, weight, ids, 1.0)
    out.backward(up)
    assert _rel_max_err(hidden.grad, ref_dh) < 2e-2


@needs_triton
def test_triton_out_of_range_token_is_nan_not_garbage():
    hidden, weight, ids, _ = _make((4,), 16, 40, torch.float32, weight_grad=False, seed=7)
    ids[2] = 40
    with torch.no_grad():
        out = selective_log_softmax_triton(hidden, weight, ids)
    assert torch.isnan(out[2])
    assert torch.isfinite(out[[0, 1, 3]]).all()
    out = selective_log_softmax_triton(hidden, weight, ids)  # gradient path too
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()


@needs_triton
def test_triton_second_backward_through_same_graph_fails_loudly():
    hidden, weight, ids, up = _make((6,), 16, 40, torch.float32, weight_grad=False, seed=8)
    out = selective_log_softmax_triton(hidden, weight, ids)
    (out * up).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out * up).sum().backward()


@needs_triton
def test_triton_empty_input():
    hidden = torch.zeros(0, 16, requires_grad=True)
    weight = torch.randn(30, 16)
    out = selective_log_softmax_triton(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()
    assert hidden.grad.shape == (0, 16)


class _MaxAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (in bytes) any aten op returns; every allocation goes through one,
    including the interpreter's byte-view copies of kernel arguments."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


@needs_triton
def test_triton_never_allocates_tokens_by_vocab():
    n, hdim, vocab = 64, 16, 2000
    hidden, weight, ids, up = _make((n,), hdim, vocab, torch.float32, weight_grad=True, seed=9)
    ref_out, ref_dh, ref_dw = _oracle(hidden, weight, ids, 1.0, up)
    with _MaxAllocation() as rec:
        # D chunks of all 64 tokens x 512 vocab ids: one token chunk, 4 vocab chunks
        out = selective_log_softmax_triton(hidden, weight, ids, token_chunk=32, vocab_chunk=256,
                                           chunk_bytes=n * 512 * 4)
        out.backward(up)
    # Largest: the weight gradient itself (V x H fp32) and D (64 x 512 fp32); never N x V.
    assert rec.max_bytes <= 4 * max(vocab * hdim, n * 512)
    assert rec.max_bytes < 4 * n * vocab // 3
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden.grad, ref_dh, rtol=1e-4, atol=1e-5 * ref_dh.abs().max().item())
    torch.testing.assert_close(weight.grad, ref_dw, rtol=1e-4, atol=1e-5 * ref_dw.abs().max().item())
    # Control: the same probe sees the reference's materialized logits.
    with _MaxAllocation() as rec_ref:
        selective_log_softmax_reference(hidden, weight, ids).backward(up)
    assert rec_ref.max_bytes >= 4 * n * vocab


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_matches_reference(dtype, weight_grad):
    hidden, weight, ids, up = _make((3, 13), 40, 90, dtype, weight_grad=weight_grad, seed=10)
    if dtype == torch.float32:
        ref_out, ref_dh, ref_dw = _oracle(hidden, weight, ids, 0.8, up)
        out_tol, grad_tol = 1e-5, 1e-4
    else:
        # Like the reference, the chunked version rounds logits to bf16 in the lm_head matmul, so the
        # oracle is the reference on the same bf16 inputs.
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(weight_grad)
        ref_out = selective_log_softmax_reference(h, w, ids, 0.8)
        ref_out.backward(up)
        ref_out, ref_dh, ref_dw = ref_out.detach(), h.grad, w.grad
        out_tol, grad_tol = 1e-2, 2e-2
    out = selective_log_softmax_chunked(hidden, weight, ids, 0.8, chunk_size=7)
    out.backward(up)
    assert (out.detach() - ref_out).abs().max().item() < out_tol
    assert _rel_max_err(hidden.grad, ref_dh) < grad_tol
    if weight_grad:
        assert _rel_max_err(weight.grad, ref_dw) < grad_tol
    else:
        assert weight.grad is None


def test_reference_rejects_bad_inputs():
    h = torch.randn(4, 8)
    w = torch.randn(10, 8)
    with pytest.raises(ValueError):
        selective_log_softmax_reference(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        selective_log_softmax_reference(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError):
        selective_log_softmax_reference(h, w, torch.zeros(4))
    with pytest.raises(ValueError):
        selective_log_softmax_reference(h, w, torch.zeros(4, dtype=torch.long), temperature=0.0)


# --------------------------------------------------------------------------------------------------
# The compiled kernels, checked for an H100 (sm_90) on this CPU-only machine: Triton's bundled ptxas
# compiles them ahead of time; no spills to local memory, shared memory within the 227 KiB limit.
# --------------------------------------------------------------------------------------------------


def _ptxas_tools():
    if not triton_available():
        return None
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        return None  # triton.jit and triton.language are interpreter objects then; nothing to compile
    import triton

    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas, cuobjdump = os.path.join(base, "ptxas"), os.path.join(base, "cuobjdump")
    if not (os.path.exists(ptxas) and os.path.exists(cuobjdump)):
        return None
    return cuobjdump


def _aot_compile_sm90(fn, signature, constexprs, divisible, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in divisible}
    src = ASTSource(triton.jit(fn), signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_ptxas_tools(), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    return compiled, local


def _tile_signature(mode, dt):
    from compilepass.kernels._logprobs_triton import logits_tile_kernel
    import inspect

    sig = {}
    const_names = ("MODE", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EVEN_K", "UPCAST", "PRECISION", "ENTROPY")
    for name in inspect.signature(logits_tile_kernel).parameters:
        if name in const_names:
            sig[name] = "constexpr"
        elif name in ("h_ptr", "w_ptr"):
            sig[name] = "*" + dt
        elif name == "ids_ptr":
            sig[name] = "*i64"
        elif name == "out_ptr":
            sig[name] = "*" + dt if mode != 0 else "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "inv_temp":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return logits_tile_kernel, sig


SM90_CASES = [(mode, cfg, "bf16") for mode in (0, 1, 2) for cfg in lp_mod.cuda_candidates(torch.bfloat16)[:2]]
SM90_CASES += [(1, cfg, "bf16") for cfg in lp_mod.cuda_candidates(torch.bfloat16)[2:]]
SM90_CASES += [(mode, lp_mod.cuda_candidates(torch.float32)[0], "fp32") for mode in (0, 1, 2)]
SM90_CASES = [(mode, cfg, dt, False) for mode, cfg, dt in SM90_CASES]
# with the tile entropies (modes 0 and 1 only): every bf16 candidate, the fp32 one
SM90_CASES += [(mode, cfg, "bf16", True) for mode in (0, 1) for cfg in lp_mod.cuda_candidates(torch.bfloat16)]
SM90_CASES += [(mode, lp_mod.cuda_candidates(torch.float32)[0], "fp32", True) for mode in (0, 1)]


@pytest.mark.skipif(_ptxas_tools() is None, reason="no triton ptxas/cuobjdump, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("mode,cfg,dt,entropy", SM90_CASES, ids=lambda x: (
    f"{x.block_m}x{x.block_n}x{x.block_k}w{x.num_warps}s{x.num_stages}" if isinstance(x, TileConfig)
    else ("entropy" if x is True else "" if x is False else str(x))))
def test_tile_kernel_compiles_for_sm90_without_spills(mode, cfg, dt, entropy):
    fn, sig = _tile_signature(mode, dt)
    consts = dict(MODE=mode, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                  EVEN_K=True, UPCAST=False, PRECISION="tf32x3" if dt == "fp32" else "tf32", ENTROPY=entropy)
    divisible = {n for n in sig if n.endswith("_ptr")} | {"K", "stride_h", "stride_w", "stride_out"}
    compiled, local = _aot_compile_sm90(fn, sig, consts, divisible, cfg.num_warps, cfg.num_stages)
    assert local == 0, "register spills to local memory"
    assert compiled.metadata.shared <= 227 * 1024
    assert "wgmma.mma_async" in compiled.asm["ptx"]  # Hopper tensor-core MMA, not a fallback


@pytest.mark.skipif(_ptxas_tools() is None, reason="no triton ptxas/cuobjdump, or TRITON_INTERPRET=1")
def test_grpo_kernel_compiles_for_sm90():
    from compilepass.kernels._grpo_triton import grpo_token_kernel

    sig = {n: "*fp32" for n in ("logp_ptr", "old_ptr", "ref_ptr", "adv_ptr", "mask_ptr", "roww_ptr", "isw_ptr",
                                "seq_ptr", "grad_ptr", "gradw_ptr", "part_ptr")}
    sig.update({"n_elem": "i32", "T": "i32", "eps_low": "fp32", "eps_high": "fp32", "beta": "fp32"})
    consts = dict(HAS_OLD=True, HAS_KL=True, HAS_ISW=True, SEQ=True, CISPO=False, KL_BIAS=True, NEED_GRAD=True,
                  BLOCK=1024)  # the widest variant: every option of the kernel on
    sig.update({k: "constexpr" for k in consts})
    compiled, local = _aot_compile_sm90(grpo_token_kernel, sig, consts, {n for n in sig if n.endswith("_ptr")}, 4, 1)
    assert local == 0


# --------------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels against the reference (skipped without CUDA).
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("n,hdim,vocab", [(1, 64, 1000), (777, 200, 5003), (4096, 512, 32000)])
def test_triton_cuda_matches_reference(dtype, weight_grad, n, hdim, vocab):
    dev = torch.device("cuda")
    hidden, weight, ids, up = _make((n,), hdim, vocab, dtype, weight_grad=weight_grad, seed=11, device=dev)
    _check(selective_log_softmax_triton, hidden, weight, ids, up, 0.9, dtype,
           token_chunk=1024, vocab_chunk=8192)

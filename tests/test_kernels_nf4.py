"""The NF4 matmul kernel (kernels/nf4_matmul.py): its PyTorch reference against bitsandbytes' own
dequantization, the Triton kernel (interpreter on CPU) against the reference, the op inside
torch.compile, the kernel compiled for sm90 (the H200) without a GPU, and the engine generating
through it with the very tokens of bitsandbytes' matmul."""

from __future__ import annotations

import pytest
import torch

from compilepass.core.quantize import bitsandbytes_available

pytestmark = pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes is not installed")
triton = pytest.importorskip("triton")

NEW = 8
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1], [7, 7]]


def nf4_weight(n, k, nested=True, seed=0):
    """A Params4bit [n, k] quantized from random float weights (double quantization when ``nested``)."""
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, compress_statistics=nested,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=nested, quant_type="nf4",
                                     module=layer)
    return layer.to("cpu").weight


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "fp32-scales"])
def test_reference_is_bitsandbytes_dequantization(nested):
    import bitsandbytes as bnb

    from compilepass.kernels.nf4_matmul import nf4_matmul_reference, nf4_operands

    w = nf4_weight(40, 320, nested)
    x = torch.randn(3, 320)
    deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    torch.testing.assert_close(nf4_matmul_reference(x, *nf4_operands(w)), x @ deq.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "fp32-scales"])
@pytest.mark.parametrize("n,k", [(24, 100), (4, 96), (33, 96)])
def test_reference_is_the_flat_block_dequantization_when_blocks_span_rows(nested, n, k):
    """K not a multiple of the block size: a scale's block runs on into the next row (bitsandbytes'
    CUDA and default backends, flat index // blocksize). bitsandbytes' CPU dequantize_4bit differs
    there, so the oracle is its default backend's dequantization, on the dequantized scales."""
    import bitsandbytes as bnb
    import bitsandbytes.backends.default.ops as default_ops

    from compilepass.kernels.nf4_matmul import nf4_matmul_reference, nf4_operands

    w = nf4_weight(n, k, nested, seed=n * k)
    qs = w.quant_state
    absmax = (bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset) if nested else qs.absmax
    compute = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)
    deq = compute(w.data.view(-1), absmax.float(), qs.code, qs.blocksize, (n, k), torch.float32)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(nf4_matmul_reference(x, *nf4_operands(w)), x @ deq.t(), rtol=1e-5, atol=1e-5)


def test_weights_in_other_storage_are_not_taken():
    """quant_storage=bf16 (FSDP-QLoRA checkpoints) packs the same bytes in another dtype: the kernel
    would read the values, not the bytes; it is left to bitsandbytes."""
    import bitsandbytes as bnb

    from compilepass.kernels.nf4_matmul import supports

    layer = bnb.nn.Linear4bit(64, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              quant_storage=torch.bfloat16, device="meta")
    layer.weight = bnb.nn.Params4bit(torch.randn(16, 64) * 0.05, requires_grad=False, quant_type="nf4",
                                     quant_storage=torch.bfloat16, module=layer)
    weight = layer.to("cpu").weight
    assert weight.dtype == torch.bfloat16 and weight.quant_state is not None
    assert not supports(weight)
    assert supports(nf4_weight(16, 64))


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "fp32-scales"])
@pytest.mark.parametrize("n,k", [(96, 128), (40, 320), (24, 100)], ids=["split-k", "k-5-blocks", "blocks-span-rows"])
@pytest.mark.parametrize("m", [1, 5, 33, 80], ids=["m1", "m5", "m33", "m80-dequant-then-gemm"])
def test_triton_kernel_matches_the_reference(nested, n, k, m):
    """K multiples of the block size take the aligned path (one scale per row and step), 100 the general one;
    80 rows, more than DEQUANT_ROWS, dequantize W once and multiply."""
    from compilepass.kernels.nf4_matmul import nf4_matmul, nf4_matmul_reference, nf4_operands, supports

    w = nf4_weight(n, k, nested, seed=n + k)
    assert supports(w)
    ops = nf4_operands(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    torch.testing.assert_close(nf4_matmul(x, *ops), nf4_matmul_reference(x, *ops), rtol=1e-5, atol=1e-5)


def test_bf16_inputs_and_leading_dims():
    from compilepass.kernels.nf4_matmul import nf4_matmul, nf4_matmul_reference, nf4_operands

    w = nf4_weight(64, 128)
    ops = nf4_operands(w)
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    y = nf4_matmul(x, *ops)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), nf4_matmul_reference(x, *ops).float(), rtol=2e-2, atol=2e-2)


def test_the_op_traces_whole_under_torch_compile():
    from compilepass.kernels.nf4_matmul import nf4_matmul, nf4_operands

    w = nf4_weight(48, 128)
    ops = nf4_operands(w)
    x = torch.randn(4, 128)
    compiled = torch.compile(lambda t: torch.relu(nf4_matmul(t, *ops)) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), torch.relu(nf4_matmul(x, *ops)) * 2)


def _sm90_tools():
    from test_kernels_logprobs import _ptxas_tools

    return _ptxas_tools()


@pytest.mark.skipif(_sm90_tools() is None, reason="no triton ptxas/cuobjdump, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "general"])
@pytest.mark.parametrize("block_m,x_dtype", [(16, "bf16"), (32, "bf16"), (64, "bf16"), (32, "fp32")])
def test_kernel_compiles_for_sm90_without_spills(block_m, x_dtype, aligned):
    import inspect

    from test_kernels_logprobs import _aot_compile_sm90

    from compilepass.kernels._nf4_triton import nf4_matmul_kernel

    consts = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_KH=32 if aligned else 64, BLOCKSIZE=64, BLOCKSIZE2=256,
                  NESTED=True, UPCAST=x_dtype == "fp32", PRECISION="tf32x3",  # fp32 activations: the 3xTF32 dot
                  ALIGNED=aligned)  # as nf4_matmul launches it: one block per row and step when aligned
    sig = {}
    for name in inspect.signature(nf4_matmul_kernel).parameters:
        sig[name] = ("constexpr" if name in consts else f"*{x_dtype}" if name == "x_ptr" else "*u8" if name in (
            "w_ptr", "absmax_ptr") else "*fp32" if name.endswith("_ptr") else "i32")
    divisible = {n for n in sig if n.endswith("_ptr")} | {"K", "stride_xm"}
    compiled, local = _aot_compile_sm90(nf4_matmul_kernel, sig, consts, divisible, 4, 3)
    assert local == 0, "register spills to local memory"
    assert "mma" in compiled.asm["ptx"]  # tensor-core MMA (mma.sync or wgmma), not a scalar loop


@pytest.mark.skipif(_sm90_tools() is None, reason="no triton ptxas/cuobjdump, or TRITON_INTERPRET=1")
def test_dequant_kernel_compiles_for_sm90_without_spills():
    import inspect

    from test_kernels_logprobs import _aot_compile_sm90

    from compilepass.kernels._nf4_triton import nf4_dequant_kernel

    consts = dict(BLOCK=1024, BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=True)
    sig = {name: ("constexpr" if name in consts else "*u8" if name in ("w_ptr", "absmax_ptr") else "*bf16"
                  if name == "out_ptr" else "*fp32" if name.endswith("_ptr") else "i64")
           for name in inspect.signature(nf4_dequant_kernel).parameters}
    compiled, local = _aot_compile_sm90(nf4_dequant_kernel, sig, consts, {n for n in sig if n.endswith("_ptr")}, 4, 1)
    assert local == 0, "register spills to local memory"


def test_engine_tokens_through_the_kernel_equal_bitsandbytes(monkeypatch):
    """The native engine on a 4-bit tiny model: greedy tokens and log-probs with COMPILEPASS_NF4_MATMUL=triton
    equal those of bitsandbytes' matmul (the default)."""
    from quant_helpers import quantized_tiny

    from compilepass.standby.rollout import linear4bit
    from compilepass.standby.rollout.engine import RolloutEngine

    model = quantized_tiny("tiny")
    engine = RolloutEngine(model, max_batch=4, max_len=32, compile_options=False)
    ref = engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    monkeypatch.setenv(linear4bit.MATMUL_ENV, "triton")
    calls = []
    real = linear4bit.nf4_matmul
    monkeypatch.setattr(linear4bit, "nf4_matmul", lambda *a: calls.append(1) or real(*a))
    engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    assert not calls, "the backend is the one the engine was built with, not read again at each call"
    engine = RolloutEngine(model, max_batch=4, max_len=32, compile_options=False)
    out = engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    assert calls, "the kernel was not called"
    assert torch.equal(out.completion_ids, ref.completion_ids)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv(linear4bit.MATMUL_ENV, "fast")
    from compilepass.core.errors import ConfigError

    with pytest.raises(ConfigError, match="COMPILEPASS_NF4_MATMUL"):
        RolloutEngine(model, max_batch=4, max_len=32, compile_options=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled kernel")
@pytest.mark.parametrize("m", [1, 8, 32, 64, 128])
def test_compiled_kernel_on_cuda_matches_the_reference_and_replays_in_a_graph(m):
    """bf16 activations at decode batches on a qwen3-0.6b-sized projection (1024 -> 3072), eager and replayed
    from a CUDA graph."""
    from compilepass.kernels.nf4_matmul import nf4_matmul, nf4_matmul_reference, nf4_operands

    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(1024, 3072, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", device="meta")  # Params4bit quantizes on its move to CUDA
    layer.weight = bnb.nn.Params4bit(torch.randn(3072, 1024) * 0.05, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=layer)
    w = layer.to("cuda").weight
    ops = nf4_operands(w)
    x = torch.randn(m, 1024, device="cuda").to(torch.bfloat16)
    ref = nf4_matmul_reference(x, *ops).float()
    torch.testing.assert_close(nf4_matmul(x, *ops).float(), ref, rtol=2e-2, atol=2e-2)
    deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    # the reference returns bf16: within its rounding (2**-8 relative) and one ulp of accumulation order
    torch.testing.assert_close(ref, (x.float() @ deq.t()), rtol=2 ** -7, atol=1e-3)
    static_x = x.clone()
    nf4_matmul(static_x, *ops)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nf4_matmul(static_x, *ops)
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), nf4_matmul_reference(static_x, *ops).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the engine's graphs and Inductor")
@pytest.mark.parametrize("backend", ["bnb", "triton"])
def test_4bit_engine_on_cuda_captures_its_graphs(backend, monkeypatch):
    """The native engine on a 4-bit tiny model on CUDA, compiled with Inductor and captured in CUDA graphs,
    through bitsandbytes' matmul and through ours: no capture error, and greedy tokens that agree with the
    eager 4-bit engine's (the same matmul outside any graph)."""
    from model_helpers import make_model

    from compilepass.core.models import add_lora
    from compilepass.core.quantize import quantize_linears
    from compilepass.standby.rollout import linear4bit
    from compilepass.standby.rollout.engine import RolloutEngine

    monkeypatch.setenv(linear4bit.MATMUL_ENV, backend)
    model = make_model("tiny", seed=0).to("cuda", torch.bfloat16)
    quantize_linears(model, torch.bfloat16)
    model = add_lora(model, rank=4, alpha=8, seed=0, init_random=True, init_std=0.1)
    graphs = RolloutEngine(model, max_batch=4, max_len=32, compile_options={}, persistent_compile=False)
    eager = RolloutEngine(model, max_batch=4, max_len=32, compile_options=False, use_cuda_graphs=False)
    assert graphs.graph_error is None and graphs.use_cuda_graphs
    a = graphs.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    b = eager.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    assert torch.equal(a.completion_ids[:, 0], b.completion_ids[:, 0])
    agree = float((a.completion_ids == b.completion_ids).float().mean())
    assert agree >= 0.75, (agree, a.completion_ids, b.completion_ids)

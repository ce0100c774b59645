"""The split-sequence decode-attention kernel against its PyTorch definition (Triton interpreter on
CPU, compiled on CUDA), its plan, its input checks and its use under torch.compile."""

from __future__ import annotations

import pytest
import torch

from compilepass.kernels._triton_support import triton_available
from compilepass.kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    split_plan,
    supported,
)

pytestmark = [pytest.mark.skipif(not triton_available(), reason="triton is not importable"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]


def _inputs(B, H, KV, S, D, dtype, device="cpu", seed=0, extra_rows=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B + extra_rows, KV, S, D, generator=g).to(dtype)
    v = torch.randn(B + extra_rows, KV, S, D, generator=g).to(dtype)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S  # the full cache
    if B > 1:
        lengths[1] = 1  # one position only
    return q.to(device), k.to(device), v.to(device), lengths.to(device)


def test_split_plan():
    assert split_plan(48) == (128, 1)
    assert split_plan(384) == (128, 3)
    assert split_plan(8192) == (128, 64)
    chunk, splits = split_plan(131072)
    assert splits <= 64 and chunk * splits >= 131072 and chunk % 64 == 0
    assert supported(128) and supported(16) and not supported(80) and not supported(8)


# (B, H, KV, S, D): GQA 2:1 and 4:1, MHA, a cache over several splits (S=300 -> 3 splits of 128)
SHAPES = [(3, 4, 2, 40, 16), (2, 8, 2, 300, 32), (2, 2, 2, 17, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference_cpu(shape, dtype):
    q, k, v, lengths = _inputs(*shape, dtype)
    scale = shape[-1] ** -0.5
    y = decode_attention(q, k, v, lengths, scale)
    ref = decode_attention_reference(q, k, v, lengths, scale)
    assert y.shape == q.shape and y.dtype == dtype and y.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=1.6e-2)
    torch.testing.assert_close(y.float(), ref.float(), **tol)


def test_positions_past_length_are_never_read():
    """NaN in every cache position at or past a row's length must not reach its output."""
    q, k, v, lengths = _inputs(3, 4, 2, 150, 16, torch.float32)
    lengths = torch.tensor([150, 7, 130])
    for b, n in enumerate(lengths.tolist()):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    y = decode_attention(q, k, v, lengths, 0.25)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, decode_attention_reference(q, k.nan_to_num(), v.nan_to_num(), lengths, 0.25))


def test_bad_input_is_one_clear_error():
    q, k, v, lengths = _inputs(2, 4, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="head size 12"):
        decode_attention(q[..., :12], k[..., :12], v[..., :12], lengths, 1.0)
    with pytest.raises(ValueError, match="lengths must have shape"):
        decode_attention(q, k, v, lengths[:1], 1.0)
    with pytest.raises(ValueError, match="do not match"):
        decode_attention(q[:, :3], k, v, lengths, 1.0)


def test_under_torch_compile_with_a_symbolic_batch():
    """The custom op traces with fullgraph=True and a dynamic batch dimension (its fake gives the shape)."""
    import torch._dynamo

    torch._dynamo.reset()
    calls = []

    def backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    fn = torch.compile(lambda q, k, v, n: decode_attention(q, k, v, n, 0.25) * 2, backend=backend,
                       fullgraph=True, dynamic=True)
    for B in (3, 5):  # (not 2 or 4: duck sizing would tie the batch to KV heads or query heads)
        q, k, v, lengths = _inputs(B, 4, 2, 40, 16, torch.float32, seed=B, extra_rows=2)
        torch.testing.assert_close(fn(q, k, v, lengths), 2 * decode_attention_reference(q, k, v, lengths, 0.25))
    assert len(calls) == 1, "one graph for both batch sizes"
    assert any("decode_attention" in str(n.target) for n in calls[0].graph.nodes)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernel needs a GPU")
@pytest.mark.parametrize("shape", SHAPES + [(32, 16, 8, 384, 128), (2, 64, 8, 9000, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_cuda(shape):
    q, k, v, lengths = _inputs(*shape, torch.bfloat16, device="cuda")
    scale = shape[-1] ** -0.5
    y = decode_attention(q, k, v, lengths, scale)
    torch.testing.assert_close(y.float(), decode_attention_reference(q, k, v, lengths, scale).float(),
                               rtol=0, atol=2e-2)


def _sm90_tools():
    from test_kernels_logprobs import _ptxas_tools

    return _ptxas_tools()


@pytest.mark.skipif(_sm90_tools() is None, reason="no triton ptxas/cuobjdump, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("splits", [1, 3], ids=["direct", "split"])
def test_kernels_compile_for_sm90_without_spills(splits):
    """Both kernels as the H200 runs them (bf16 cache, head size 128, GQA padded to 16 rows)."""
    import inspect

    from test_kernels_logprobs import _aot_compile_sm90

    from compilepass.kernels._decode_attention_triton import combine_kernel, partial_kernel

    consts = dict(SPLITS=splits, NR=16, D=128, BLOCK_S=64, UPCAST=False)
    sig = {}
    for name in inspect.signature(partial_kernel).parameters:
        sig[name] = ("constexpr" if name in consts else "*bf16" if name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")
                     else "*i64" if name == "len_ptr" else "*fp32" if name.endswith("_ptr")
                     else "fp32" if name == "scale" else "i32")
    divisible = {n for n in sig if n.endswith("_ptr")} | {n for n in sig if n.startswith("stride")}
    _, local = _aot_compile_sm90(partial_kernel, sig, consts, divisible, 4, 2)
    assert local == 0
    if splits > 1:
        consts = dict(SPLITS=splits, SPLITS_P2=4, NR=16, D=128)
        sig = {n: ("constexpr" if n in consts else "*bf16" if n == "out_ptr" else "*fp32" if n.endswith("_ptr")
                   else "i32") for n in inspect.signature(combine_kernel).parameters}
        _, local = _aot_compile_sm90(combine_kernel, sig, consts, {n for n in sig if n.endswith("_ptr")}, 4, 1)
        assert local == 0

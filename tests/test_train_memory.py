"""Tiled MLP and LoRA mixed precision (standby/train_memory.py): same outputs and gradients as the
plain model, through peft LoRA layers and gradient checkpointing (reentrant and not)."""

import pytest
import torch

from compilepass.core.models import add_lora, build_model
from compilepass.standby.training.checkpointing import enable_checkpointing
from compilepass.standby.training.logprobs import policy_logprobs
from compilepass.standby.training.train_memory import (lora_mixed_precision, lora_needs_mixed_precision, tile_mlp,
                                                       untile_mlp)

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
IDS = torch.tensor([[14, 15, 16, 17, 18, 19, 20], [21, 22, 23, 24, 25, 26, 27]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])


def _model(dtype=torch.float32):
    return add_lora(build_model("tiny-llama", dtype=dtype), rank=4, alpha=8, init_random=True)


def _step(model):
    model.zero_grad(set_to_none=True)
    logp = policy_logprobs(model, PROMPTS, IDS, MASK)
    logp.sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_tiled_mlp_matches_untiled(checkpointing):
    model = _model()
    if checkpointing:
        enable_checkpointing(model.get_base_model(), reentrant=checkpointing == "reentrant")
    model.train()
    ref_lp, ref_g = _step(model)
    n = tile_mlp(model, chunk_tokens=3)  # 2 x 13 tokens -> 9 chunks, the last one short
    assert n == model.get_base_model().config.num_hidden_layers
    lp, g = _step(model)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-6)
    assert g.keys() == ref_g.keys() and any("mlp" in k and "lora_B" in k for k in g)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-6, msg=k)
    with torch.no_grad():  # chunked without autograd too
        torch.testing.assert_close(policy_logprobs(model, PROMPTS, IDS, MASK), ref_lp, rtol=1e-5, atol=1e-6)
    untile_mlp(model)
    lp2, _ = _step(model)
    torch.testing.assert_close(lp2, ref_lp, rtol=0, atol=0)


def test_tile_mlp_rejects_bad_chunk():
    with pytest.raises(ValueError):
        tile_mlp(_model(), chunk_tokens=0)


def test_lora_mixed_precision_bf16_model():
    """bf16 frozen weights + float32 LoRA (peft's default): the context computes LoRA in bf16
    (close to the float32-LoRA result), gradients land in the float32 LoRA weights."""
    model = _model(torch.bfloat16)
    assert lora_needs_mixed_precision(model)
    assert not lora_needs_mixed_precision(_model(torch.float32))
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    model.train()
    ref_lp, ref_g = _step(model)
    model.zero_grad(set_to_none=True)
    with lora_mixed_precision(model):
        logp = policy_logprobs(model, PROMPTS, IDS, MASK)
        logp.sum().backward()
    g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert g.keys() == ref_g.keys() and all(v.dtype == torch.float32 for v in g.values())
    torch.testing.assert_close(logp.detach(), ref_lp, rtol=0.05, atol=0.05)
    # outside the context peft casts to float32 again
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_engine_generation_unchanged_by_tiling():
    from compilepass.standby.rollout.engine import RolloutEngine

    model = _model()
    engine = RolloutEngine(model, max_batch=2, max_len=24, compile_options=False)
    ref = engine.generate(PROMPTS, max_new_tokens=6, temperature=0).completion_ids
    tile_mlp(model, chunk_tokens=2)  # the prefill (2 x 6 tokens) now runs chunked, decode steps do not
    got = engine.generate(PROMPTS, max_new_tokens=6, temperature=0).completion_ids
    assert torch.equal(got, ref)


def test_ragged_batch_logprobs_equal_each_row_alone():
    """policy_logprobs passes no padding mask (right padding + causal attention is exact): every
    real position of a ragged batch equals that row computed alone, unpadded, through the full
    model's logits."""
    model = _model()
    model.eval()
    with torch.no_grad():
        batch = policy_logprobs(model, PROMPTS, IDS, MASK)
        for b, (p, ids, m) in enumerate(zip(PROMPTS, IDS, MASK)):
            n = int(m.sum())
            seq = torch.tensor([p + ids[:n].tolist()])
            logits = model(input_ids=seq).logits[0].float().log_softmax(-1)
            ref = logits[len(p) - 1:len(p) - 1 + n].gather(-1, ids[:n, None])[:, 0]
            torch.testing.assert_close(batch[b, :n], ref, rtol=1e-4, atol=1e-5)
            assert torch.all(batch[b, n:] == 0)


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_engine_traces_through_tiled_mlp(monkeypatch, request, fused):
    """The trainer tiles the MLPs before building its engine: the fullgraph-compiled decode step
    must trace through the tiled forward (decode steps are below the chunk size)."""
    import torch._dynamo

    from compilepass.standby.rollout.engine import RolloutEngine

    torch._dynamo.reset()
    request.addfinalizer(torch._dynamo.reset)
    model = _model()
    ref = RolloutEngine(model, max_batch=2, max_len=24, compile_options=False, fused_projections=fused)
    want = ref.generate(PROMPTS, max_new_tokens=5, temperature=0).completion_ids
    tile_mlp(model, chunk_tokens=4)
    compiled = RolloutEngine(model, max_batch=2, max_len=24, compile_options={}, compile_backend="eager", fused_projections=fused)
    assert torch.equal(compiled.generate(PROMPTS, max_new_tokens=5, temperature=0).completion_ids, want)

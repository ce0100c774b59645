"""The native decoder against transformers' own generate, on tiny random models (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_model

from compilepass.core.errors import ConfigError, ModelNotFoundError, StorageError
from compilepass.core.models import build_model
from compilepass.core.shapes import PRESETS, ModelShape
from compilepass.standby.rollout.decode import Decoder, StaticKVCache, greedy_generate

FAMILIES = ["tiny", "tiny-llama", "tiny-qwen2"]  # qwen3 (tied embeddings), llama, qwen2 (qkv bias)
NEW_TOKENS = 12
LENGTHS = [5, 9, 2]  # ragged prompts, right-padded to 9


def prompts(vocab: int):
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(0, vocab, (len(LENGTHS), max(LENGTHS)), generator=gen)
    lengths = torch.tensor(LENGTHS)
    ids[torch.arange(max(LENGTHS))[None, :] >= lengths[:, None]] = 0  # right padding
    return ids, lengths


def hf_greedy(model, ids_1d: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' generate on one unpadded sequence, eos/pad disabled so it runs n tokens."""
    ids = ids_1d[None]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:]


def make_decoder(model, batch: int = len(LENGTHS), max_len: int = 32, **kwargs) -> Decoder:
    shape = ModelShape.from_hf_config(model.config)
    return Decoder(model, StaticKVCache(shape, batch, max_len, torch.float32), **kwargs)


VARIANTS = {"matmul": {}, "fused": {"fused_projections": True}, "sdpa": {"attention": "sdpa"},
            "fused+sdpa_gqa": {"fused_projections": True, "attention": "sdpa_gqa"}}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_matches_transformers_generate(name, lora, variant):
    model = make_model(name, lora)
    ids, lengths = prompts(model.config.vocab_size)
    out = greedy_generate(make_decoder(model, **VARIANTS[variant]), ids, lengths, NEW_TOKENS)
    assert out.shape == (len(LENGTHS), NEW_TOKENS)
    assert len(out.unique()) > NEW_TOKENS // 2, "degenerate model: the comparison would prove little"
    for b, n in enumerate(LENGTHS):
        assert out[b].tolist() == hf_greedy(model, ids[b, :n], NEW_TOKENS).tolist(), f"sequence {b}"


def test_lora_adapter_changes_tokens():
    ids, lengths = prompts(256)
    base = greedy_generate(make_decoder(make_model("tiny")), ids, lengths, NEW_TOKENS)
    adapted = greedy_generate(make_decoder(make_model("tiny", lora=True)), ids, lengths, NEW_TOKENS)
    assert not torch.equal(base, adapted)


def test_optimizer_step_is_seen_without_sync():
    model = make_model("tiny-llama", lora=True)
    decoder = make_decoder(model)  # built once, before training
    ids, lengths = prompts(model.config.vocab_size)
    before = greedy_generate(decoder, ids, lengths, NEW_TOKENS)

    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params)
    opt = torch.optim.Adam(lora_params, lr=0.05)
    batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()

    after = greedy_generate(decoder, ids, lengths, NEW_TOKENS)
    assert not torch.equal(before, after)
    for b, n in enumerate(LENGTHS):
        assert after[b].tolist() == hf_greedy(model, ids[b, :n], NEW_TOKENS).tolist()


def test_cache_views_caller_storage():
    shape, batch, max_len = PRESETS["tiny"], 3, 32
    nbytes = StaticKVCache.nbytes_for(shape, batch, max_len, torch.float32)
    assert nbytes == 2 * shape.num_layers * batch * shape.num_kv_heads * max_len * shape.head_dim * 4

    storage = torch.zeros(nbytes + 64, dtype=torch.uint8)  # raw bytes, as the KV region will provide
    cache = StaticKVCache.from_storage(storage, shape, batch, max_len, dtype=torch.float32)
    per = nbytes // (2 * shape.num_layers)
    base = storage.data_ptr()
    for i in range(shape.num_layers):
        assert cache.k[i].shape == (batch, shape.num_kv_heads, max_len, shape.head_dim)
        assert cache.k[i].data_ptr() == base + (2 * i) * per
        assert cache.v[i].data_ptr() == base + (2 * i + 1) * per
    assert cache.nbytes == nbytes

    model = make_model("tiny")
    ids, lengths = prompts(256)
    decoder = Decoder(model, cache)
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    out = greedy_generate(decoder, ids, lengths, NEW_TOKENS)
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs  # written in place, never reallocated
    assert storage[:nbytes].any() and not storage[nbytes:].any()  # the cache lives in the storage
    assert torch.equal(out, greedy_generate(make_decoder(model), ids, lengths, NEW_TOKENS))

    typed = torch.zeros(nbytes // 4, dtype=torch.float32)
    assert StaticKVCache.from_storage(typed, shape, batch, max_len).k[0].data_ptr() == typed.data_ptr()
    with pytest.raises(StorageError):
        StaticKVCache.from_storage(storage[: nbytes - 4], shape, batch, max_len, dtype=torch.float32)


def test_decode_step_writes_only_its_position():
    model = make_model("tiny")
    decoder = make_decoder(model)
    ids, lengths = prompts(256)
    decoder.prefill(ids, lengths)
    before = [t.clone() for t in decoder.cache.k]
    positions = torch.tensor([5, 20, 2])
    decoder.decode_step(torch.tensor([1, 2, 3]), positions)
    for old, new in zip(before, decoder.cache.k):
        changed = (old != new).any(dim=(1, 3))  # [batch, max_len]
        expected = torch.zeros_like(changed)
        expected[torch.arange(3), positions] = True
        assert torch.equal(changed, expected)


def test_eos_repeats_after_finish():
    model = make_model("tiny")
    ids, lengths = prompts(256)
    free = greedy_generate(make_decoder(model), ids, lengths, NEW_TOKENS)
    eos = int(free[0, 3])
    out = greedy_generate(make_decoder(model), ids, lengths, NEW_TOKENS, eos_token_id=eos)
    for b in range(len(LENGTHS)):
        hits = (free[b] == eos).nonzero()
        if len(hits):
            first = int(hits[0])
            assert out[b, : first + 1].tolist() == free[b, : first + 1].tolist()
            assert (out[b, first:] == eos).all()
        else:
            assert torch.equal(out[b], free[b])


def test_presets_have_published_shapes():
    q = PRESETS["qwen3-0.6b"]
    assert (q.num_layers, q.hidden_size, q.num_heads, q.num_kv_heads, q.head_dim, q.vocab_size) == (
        28, 1024, 16, 8, 128, 151_936)
    assert q.tie_word_embeddings and q.intermediate_size == 3072
    for name, shape in PRESETS.items():
        assert ModelShape.from_hf_config(shape.to_hf_config()) == shape, name
    # built on the target device directly: the meta device allocates nothing
    model = build_model("qwen3-0.6b", device="meta")
    assert model.dtype == torch.bfloat16 and next(model.parameters()).device.type == "meta"
    assert 590e6 < sum(p.numel() for p in model.parameters()) < 600e6


def test_unknown_model_raises():
    with pytest.raises(ModelNotFoundError, match="qwen3-0.6b"):
        build_model("no-such-model")
    with pytest.raises(ModelNotFoundError):
        build_model("/nonexistent/path/to/model")


@pytest.mark.slow
def test_compiled_decode_step_matches_eager():
    model = make_model("tiny", lora=True)  # peft's LoRA layers inside the graph, the hard case
    decoder = make_decoder(model, batch=4)
    ids, lengths = prompts(256)
    step = decoder.compiled_decode_step()
    decoder.prefill(ids, lengths)
    tokens, positions = torch.tensor([1, 2, 3]), torch.tensor([5, 9, 2])  # batch 3 < cache batch 4
    eager = decoder.decode_step(tokens, positions)
    compiled = step(tokens, positions)  # fullgraph=True: any graph break raises
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    out = greedy_generate(decoder, ids, lengths, NEW_TOKENS, step_fn=step)
    assert torch.equal(out, greedy_generate(decoder, ids, lengths, NEW_TOKENS))


def _inside(t: torch.Tensor, big: torch.Tensor) -> bool:
    lo = big.data_ptr()
    return lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= lo + big.numel() * big.element_size()


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_fused_projections_keep_one_copy(name, tmp_path):
    """The fused path re-points q/k/v (+ bias) and gate/up parameters into one tensor each: same
    parameter objects, same values, same logits; LoRA stays trainable and savable."""
    model = make_model(name, lora=True)
    ids, lengths = prompts(model.config.vocab_size)
    plain = make_decoder(model)
    ref_logits = plain.prefill(ids, lengths)
    ref_tokens = greedy_generate(plain, ids, lengths, NEW_TOKENS)
    params_before = {n: p for n, p in model.named_parameters()}
    values_before = {n: p.detach().clone() for n, p in params_before.items()}

    fused = make_decoder(model, fused_projections=True)
    assert dict(model.named_parameters()) == params_before, "the same parameter objects"
    for n, p in model.named_parameters():
        assert torch.equal(p, values_before[n]), n
    layer = fused.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gu = fused.fused.qkv[0], fused.fused.gate_up[0]
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert _inside(proj.base_layer.weight, qkv.weight)
        if name == "tiny-qwen2":
            assert _inside(proj.base_layer.bias, qkv.bias)
    for proj in (mlp.gate_proj, mlp.up_proj):
        assert _inside(proj.base_layer.weight, gu.weight)
    assert make_decoder(model, fused_projections=True).fused is fused.fused, "fusing twice reuses the fusion"

    torch.testing.assert_close(fused.prefill(ids, lengths), ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy_generate(fused, ids, lengths, NEW_TOKENS), ref_tokens)

    # the peft adapter still saves (LoRA tensors only) and the HF model still trains through the views
    model.save_pretrained(tmp_path / "adapter")
    assert any(f.name.startswith("adapter_model") for f in (tmp_path / "adapter").iterdir())
    model.train()
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.SGD(lora_params, lr=0.5)
    batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    model(input_ids=batch, labels=batch).loss.backward()
    assert all(p.grad is not None for p in lora_params)
    opt.step()
    model.eval()
    after = greedy_generate(fused, ids, lengths, NEW_TOKENS)
    assert not torch.equal(after, ref_tokens), "the LoRA update is seen with no sync"
    assert torch.equal(after, greedy_generate(make_decoder(model), ids, lengths, NEW_TOKENS))
    for b, n in enumerate(LENGTHS):
        assert after[b].tolist() == hf_greedy(model, ids[b, :n], NEW_TOKENS).tolist()

    # an in-place change of a base weight lands in the fused tensor
    with torch.no_grad():
        attn.k_proj.base_layer.weight.mul_(-1.0)
    assert torch.equal(qkv.weight[qkv.rows[1]:qkv.rows[2]], attn.k_proj.base_layer.weight)
    torch.testing.assert_close(fused.prefill(ids, lengths), make_decoder(model).prefill(ids, lengths),
                               rtol=1e-5, atol=1e-5)


def test_fused_projections_full_finetune_and_broken_fusion(tmp_path):
    """Without LoRA the trainer updates the view parameters themselves; the whole model still saves
    and loads; moving the model breaks the fusion, which is detected instead of decoding with stale
    weights."""
    from transformers import AutoModelForCausalLM

    model = make_model("tiny")
    ids, lengths = prompts(256)
    fused = make_decoder(model, fused_projections=True)
    before = greedy_generate(fused, ids, lengths, NEW_TOKENS)
    model.save_pretrained(tmp_path / "full")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    model.eval()
    assert fused.fused.is_intact()
    after = greedy_generate(fused, ids, lengths, NEW_TOKENS)
    assert not torch.equal(before, after)
    assert torch.equal(after, greedy_generate(make_decoder(model), ids, lengths, NEW_TOKENS))

    model.to(torch.float64)  # every parameter gets new storage
    assert not fused.fused.is_intact()
    with pytest.raises(RuntimeError, match="fused"):
        fused.prefill(ids, lengths)


def test_fused_projections_follow_disabled_adapters():
    model = make_model("tiny", lora=True)
    ids, lengths = prompts(256)
    fused = make_decoder(model, fused_projections=True)
    with_lora = greedy_generate(fused, ids, lengths, NEW_TOKENS)
    with model.disable_adapter():
        without = greedy_generate(fused, ids, lengths, NEW_TOKENS)
        assert torch.equal(without, greedy_generate(make_decoder(model), ids, lengths, NEW_TOKENS))
    assert not torch.equal(with_lora, without)
    with pytest.raises(ConfigError, match="attention"):
        make_decoder(model, attention="flash")


def _lora_step(model, lr=0.5):
    model.train()
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.SGD(lora_params, lr=lr)
    batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    model.eval()


def test_packed_lora_keeps_its_addresses_and_follows_every_step():
    """The packed copies (A stacked, B block-diagonal) stay at one address, so a CUDA graph reading
    them sees each refresh, and every prefill copies the adapters' current values into them."""
    model = make_model("tiny-qwen2", lora=True)
    ids, lengths = prompts(model.config.vocab_size)
    decoder = make_decoder(model, fused_projections=True)
    groups = [*decoder.fused.qkv, *decoder.fused.gate_up]
    assert all(g.packed is not None for g in groups)
    ptrs = [(g.packed.a.data_ptr(), g.packed.b.data_ptr()) for g in groups]
    state = decoder.adapter_state
    before = greedy_generate(decoder, ids, lengths, NEW_TOKENS)
    _lora_step(model)
    after = greedy_generate(decoder, ids, lengths, NEW_TOKENS)
    assert [(g.packed.a.data_ptr(), g.packed.b.data_ptr()) for g in groups] == ptrs
    assert not torch.equal(before, after)
    for b, n in enumerate(LENGTHS):
        assert after[b].tolist() == hf_greedy(model, ids[b, :n], NEW_TOKENS).tolist()
    qkv = decoder.fused.qkv[0]
    attn = decoder.layers[0].self_attn
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    assert torch.equal(qkv.packed.a, torch.cat([m.lora_A["default"].weight for m in mods]))
    expect = torch.block_diag(*[m.lora_B["default"].weight for m in mods])
    assert torch.equal(qkv.packed.b, expect)  # the B blocks on the diagonal, zeros elsewhere
    assert qkv.packed.scale.tolist() == [mods[0].scaling["default"]] * qkv.weight.shape[0]
    assert decoder.sync_adapters() == state  # same adapters, new values: refreshed in place
    assert all(g.layout == 1 for g in groups)


def test_packed_lora_says_when_the_adapters_layout_changed():
    """Disabling, re-adding dropout or replacing an adapter changes what a captured graph would have
    to read: the layout ``sync_adapters`` returns changes (the engine then refuses to replay), and
    generation itself follows the model's adapters whichever path it takes."""
    model = make_model("tiny", lora=True)
    ids, lengths = prompts(256)
    decoder = make_decoder(model, fused_projections=True)
    plain = make_decoder(model, fused_projections=True, pack_lora=False)
    assert plain.fused is decoder.fused  # one fusion per model; packing is each decoder's choice
    packed0, plain0 = decoder.adapter_state, plain.adapter_state
    assert decoder.sync_adapters() == packed0 and plain.sync_adapters() == plain0
    packed_ptr = decoder.fused.qkv[0].packed.a.data_ptr()
    with model.disable_adapter():
        assert decoder.sync_adapters() != packed0 and plain.sync_adapters() != plain0
        without = greedy_generate(decoder, ids, lengths, NEW_TOKENS)
        assert torch.equal(without, greedy_generate(make_decoder(model), ids, lengths, NEW_TOKENS))
        assert torch.equal(without, greedy_generate(plain, ids, lengths, NEW_TOKENS))
    assert decoder.sync_adapters() == packed0 and plain.sync_adapters() == plain0  # back as before
    assert decoder.fused.qkv[0].packed.a.data_ptr() == packed_ptr  # the same packed tensors again
    packed = greedy_generate(decoder, ids, lengths, NEW_TOKENS)
    assert not torch.equal(packed, without)
    assert torch.equal(packed, greedy_generate(plain, ids, lengths, NEW_TOKENS))
    torch.testing.assert_close(decoder.prefill(ids, lengths), make_decoder(model).prefill(ids, lengths),
                               rtol=1e-5, atol=1e-5)

    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    q_proj.lora_dropout["default"] = torch.nn.Dropout(0.5)
    assert plain.sync_adapters() != plain0  # a graph would hold the dropout module's absence
    model.train()  # dropout active: drawn per member, as peft does, so not packed
    assert decoder.sync_adapters() != packed0
    model.eval()
    assert decoder.sync_adapters() == packed0
    old_a = q_proj.lora_A["default"]
    q_proj.lora_A["default"] = torch.nn.Linear(old_a.in_features, old_a.out_features, bias=False)
    plain1 = plain.sync_adapters()
    assert decoder.sync_adapters() != packed0  # a new adapter tensor: packed anew, at new addresses
    assert decoder.fused.qkv[0].layout == 2 and decoder.fused.qkv[0].packed.a.data_ptr() != packed_ptr
    assert torch.equal(decoder.fused.qkv[0].packed.a[:old_a.out_features], q_proj.lora_A["default"].weight)
    q_proj.lora_A["default"] = old_a
    assert plain.sync_adapters() != plain1  # a graph of the per-member path reads the tensors too
    assert torch.equal(greedy_generate(decoder, ids, lengths, NEW_TOKENS), greedy_generate(plain, ids, lengths, NEW_TOKENS))


def test_packed_lora_in_bf16_matches_the_per_member_path():
    """bfloat16 adapters (peft with autocast_adapter_dtype=False): the packed delta rounds as peft's
    ``B(A(x)) * scaling`` does."""
    model = make_model("tiny-llama", lora=True).to(torch.bfloat16)
    shape = ModelShape.from_hf_config(model.config)
    ids, lengths = prompts(model.config.vocab_size)
    packed = Decoder(model, StaticKVCache(shape, 3, 32, torch.bfloat16), fused_projections=True)
    assert packed.fused.qkv[0].packed.a.dtype == torch.bfloat16
    logits = packed.prefill(ids, lengths)
    per_member = Decoder(model, StaticKVCache(shape, 3, 32, torch.bfloat16), fused_projections=True, pack_lora=False)
    ref = per_member.prefill(ids, lengths)
    assert (logits.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()
    x = torch.randn(4, model.config.hidden_size, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    gu = packed.fused.gate_up[0]
    packed.sync_adapters()
    mlp = packed.layers[0].mlp
    assert gu.packed is not None
    got = gu.packed.delta(gu.modules[0], x)
    want = torch.cat([m.lora_B["default"](m.lora_A["default"](x)) * m.scaling["default"]
                      for m in (mlp.gate_proj, mlp.up_proj)], dim=-1)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0.02, atol=1e-2)


def _prefill_cases(vocab):
    gen = torch.Generator().manual_seed(5)
    for lens in ([5, 9, 2], [7, 7], [3, 11, 6], [1], [4]):  # new lengths and batches, then sizes 1
        T = max(lens)
        ids = torch.randint(0, vocab, (len(lens), T), generator=gen)
        lengths = torch.tensor(lens)
        ids[torch.arange(T)[None, :] >= lengths[:, None]] = 0
        yield ids, lengths


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_prefill_matches_the_eager_one(backend):
    """The regional prefill compile (batch and prompt length symbolic) writes the same K / V and
    returns the same logits as the eager prefill, for new shapes without a compile per shape."""
    import torch._dynamo

    model = make_model("tiny-qwen2", lora=True)
    eager = make_decoder(model, batch=3, fused_projections=True)
    compiled = make_decoder(model, batch=3, fused_projections=True)
    compiled.compile_prefill({}, backend=backend)
    torch._dynamo.reset()
    frames = []
    torch._dynamo.utils.counters.clear()
    for ids, lengths in _prefill_cases(model.config.vocab_size):
        want = eager.prefill(ids, lengths)
        got = compiled.prefill(ids, lengths)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        B, T = ids.shape
        for a, b in zip(compiled.cache.k + compiled.cache.v, eager.cache.k + eager.cache.v):
            torch.testing.assert_close(a[:B, :, :T], b[:B, :, :T], rtol=1e-4, atol=1e-4)
        frames.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
    assert frames[0] >= 1, "the compiled prefill never compiled"
    # the second and third shapes reuse one dynamic graph; the size-1 batch and length add their own
    assert frames[0] == frames[1] == frames[2] and frames[-1] - frames[0] <= 2, frames
    out = greedy_generate(compiled, *next(_prefill_cases(model.config.vocab_size)), NEW_TOKENS)
    assert torch.equal(out, greedy_generate(eager, *next(_prefill_cases(model.config.vocab_size)), NEW_TOKENS))

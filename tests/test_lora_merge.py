"""merge_lora: the engine generates with the adapters merged into the base weights and restores the
base bitwise after (compilepass.standby.rollout.lora_merge)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import lora_step, make_model

from compilepass.core.errors import ConfigError
from compilepass.standby.rollout.engine import RolloutEngine
from compilepass.standby.rollout.lora_merge import LoraMerge

NEW = 6
PROMPTS = [[5, 17, 99, 3], [200, 1, 42], [7, 7, 7, 7, 7, 8], [64, 33]]


def _base_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def _assert_bitwise(model, before: dict) -> None:
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p.detach(), before[n]), n


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_merged_generation_matches_the_unmerged_engine_and_restores_the_base_bitwise(fused):
    model = make_model("tiny-llama", lora=True)
    before = _base_weights(model)
    plain = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False, fused_projections=fused)
    merged = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False, fused_projections=fused,
                           merge_lora=True)
    _assert_bitwise(model, before)  # building (and warming) the merged engine restored the base
    assert merged.merge_lora and merged._lora_merge.cycles >= 1
    ref = plain.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    out = merged.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    assert torch.equal(out.completion_ids, ref.completion_ids)
    # float32: W + s*B@A and x@W + s*(x@A)@B agree to rounding
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-4, rtol=0)
    _assert_bitwise(model, before)
    assert not any(m.merged for m in merged._lora_merge.modules), "the merged marks are removed"
    # the trainer's forward sees the live adapters, not a merged base
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=torch.tensor([PROMPTS[0]])).logits
        lora_logits = model(input_ids=torch.tensor([PROMPTS[0]])).logits
    assert (lora_logits - base_logits).abs().max() > 1e-2


def test_each_generate_merges_the_adapters_after_the_last_optimizer_step():
    model = make_model("tiny-llama", lora=True)
    engine = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False, merge_lora=True)
    first = engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    before = _base_weights(model)
    lora_step(model)
    model.eval()
    _assert_bitwise(model, before)  # the step changed only the adapters
    after = engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    assert not torch.equal(first.completion_ids, after.completion_ids)
    fresh = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False)  # unmerged, on the new adapters
    assert torch.equal(after.completion_ids, fresh.generate(PROMPTS, max_new_tokens=NEW, temperature=0).completion_ids)
    _assert_bitwise(model, before)
    assert engine._lora_merge.snapshots == len(engine._lora_merge.modules), "host copies taken once"


def test_a_base_weight_changed_in_place_is_copied_again_not_reverted():
    model = make_model("tiny-llama", lora=True)
    engine = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False, merge_lora=True)
    engine.generate(PROMPTS, max_new_tokens=2, temperature=0)
    lm = engine._lora_merge
    w = lm.modules[0].get_base_layer().weight
    with torch.no_grad():
        w.mul_(0.5)  # a user's in-place change (bumps the version)
    changed = w.detach().clone()
    engine.generate(PROMPTS, max_new_tokens=2, temperature=0)
    assert torch.equal(w.detach(), changed), "the restore kept the change"
    assert lm.snapshots == len(lm.modules) + 1


def test_a_failure_inside_the_merge_still_restores_the_base():
    model = make_model("tiny-llama", lora=True)
    before = _base_weights(model)
    lm = LoraMerge(model)
    with pytest.raises(RuntimeError, match="boom"):
        with lm.merged():
            assert lm.active and all(m.merged for m in lm.modules)
            assert not all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)
            raise RuntimeError("boom")
    assert not lm.active
    _assert_bitwise(model, before)
    assert not any(m.merged for m in lm.modules)


def test_nested_merges_are_one_cycle():
    model = make_model("tiny-llama", lora=True)
    before = _base_weights(model)
    lm = LoraMerge(model)
    with lm.merged():
        inside = _base_weights(model)
        with lm.merged():
            _assert_bitwise(model, inside)  # not merged twice
        _assert_bitwise(model, inside)  # the inner exit did not restore
    _assert_bitwise(model, before)
    assert lm.cycles == 1


def test_decode_outside_the_merged_context_is_refused_in_one_line():
    model = make_model("tiny-llama", lora=True)
    engine = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False, merge_lora=True)
    tokens, positions = torch.tensor([3, 4]), torch.tensor([0, 0])
    with pytest.raises(RuntimeError, match="inside `with engine.lora_merged\\(\\):`"):
        engine.decode(tokens, positions)
    with engine.lora_merged():
        logits = engine.decode(tokens, positions)
    assert logits.shape == (2, engine.shape.vocab_size)


def test_merge_lora_without_adapters_is_a_no_op_and_bad_bases_are_refused():
    plain = make_model("tiny-llama")
    engine = RolloutEngine(plain, max_batch=2, max_len=16, compile_options=False, merge_lora=True)
    assert not engine.merge_lora
    model = make_model("tiny-llama", lora=True)
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_bias["default"] = True
    with pytest.raises(ConfigError, match="lora_bias"):
        LoraMerge(model)


def test_grpo_config_refuses_merge_lora_with_the_vllm_engine():
    from compilepass.standby.grpo.config import default_config, load_config

    ok = load_config(base=default_config("tiny"), overrides=["generation.merge_lora=true"])
    assert ok.generation.merge_lora is True
    with pytest.raises(ConfigError, match="generation.merge_lora"):
        load_config(base=default_config("tiny"), overrides=["generation.engine=vllm", "generation.merge_lora=true"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and pinned host copies need a GPU")
def test_cuda_graphs_captured_merged_follow_each_step_and_restore_the_base():
    model = make_model("tiny-llama", lora=True).cuda()
    before = _base_weights(model)
    engine = RolloutEngine(model, max_batch=4, max_len=48, compile_options={}, merge_lora=True)
    plain = RolloutEngine(model, max_batch=4, max_len=48, compile_options={})
    assert engine._sample_graphs and all(r.tensor.is_pinned() for r in engine._lora_merge._host.values())
    _assert_bitwise(model, before)
    for step in range(2):
        out = engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
        ref = plain.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
        assert torch.equal(out.completion_ids, ref.completion_ids), step
        assert out.total_s >= engine._lora_merge.last_cycle_s > 0
        _assert_bitwise(model, before)
        lora_step(model, torch.optim.SGD, lr=0.5, seed=step, device="cuda")
        model.eval()

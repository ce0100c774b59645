"""The rollout engine against transformers' generate and a reference forward (tiny random models, CPU).

GPU-only behaviour (CUDA graphs per bucket, the CUDA KV region across sleep/wake) is tested at
the end and skipped without CUDA.
"""

from __future__ import annotations

import functools

import pytest
import torch
from model_helpers import lora_step, make_model

from compilepass.standby.rollout.backend import RolloutBackend, SamplingParams, check_generate_args
from compilepass.standby.rollout.engine import RolloutEngine, default_buckets, sample_tokens

NEW = 10
PROMPT_LENGTHS = [5, 9, 2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The engine's speed options (benchmarks/bench_rollout.py --variants); every one must decode the same.
VARIANTS = {
    "baseline": {},
    "fused": {"fused_projections": True},
    "sdpa": {"attention": "sdpa"},
    "sdpa_gqa": {"attention": "sdpa_gqa"},
    "graph_sampling": {"graph_sampling": True},
    "all": {"fused_projections": True, "attention": "sdpa", "graph_sampling": True},
    "triton": {"attention": "triton"},  # the split-sequence kernel (Triton interpreter on CPU)
    "fused-triton-gs": {"fused_projections": True, "attention": "triton", "graph_sampling": True},
}


@functools.lru_cache(maxsize=None)
def shared_model(name: str = "tiny", lora: bool = False):
    return make_model(name, lora)


@functools.lru_cache(maxsize=None)
def shared(name: str = "tiny", lora: bool = False, variant: str = "baseline"):
    """(model, engine) built once per module for the tests that do not change the weights (one model
    per (name, lora): a fused variant re-points its parameters, which the others then read as is)."""
    model = shared_model(name, lora)
    return model, RolloutEngine(model, max_batch=4, max_len=48, compile_options=False, **VARIANTS[variant])


def prompts(n: int = len(PROMPT_LENGTHS), vocab: int = 256, seed: int = 123) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = (PROMPT_LENGTHS * n)[:n]
    return [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in lengths]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "tiny-qwen2"])  # qwen3 (tied), llama, qwen2 (bias)
def test_greedy_matches_transformers_generate(name, lora, variant):
    model, engine = shared(name, lora, variant)
    ps = prompts()
    out = engine.generate(ps, max_new_tokens=NEW, temperature=0)
    assert out.completion_ids.shape == (len(ps), NEW)
    assert out.completion_lengths.tolist() == [NEW] * len(ps)
    assert out.prompt_lengths.tolist() == PROMPT_LENGTHS
    assert bool(out.completion_mask.all())
    assert len(out.completion_ids.unique()) > NEW // 2, "degenerate model: the comparison would prove little"
    for b, p in enumerate(ps):
        assert out.completion_ids[b].tolist() == hf_greedy(model, p, NEW), f"sequence {b}"


def test_start_phases_account_for_the_cold_start():
    """``start_phases_s``: each phase of construction once, together no more than ``cold_start_s``."""
    _, engine = shared()
    phases = engine.start_phases_s
    assert list(phases) == ["kv_cache", "decoder", "options", "step", "warmup"]
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= engine.cold_start_s


def test_more_prompts_than_max_batch_are_split():
    model, engine = shared()
    ps = prompts(7)
    out = engine.generate(ps, max_new_tokens=6, temperature=0)
    assert out.completion_ids.shape == (7, 6)
    for b, p in enumerate(ps):
        single = engine.generate([p], max_new_tokens=6, temperature=0)  # batch 1, padded to bucket 2
        assert torch.equal(out.completion_ids[b], single.completion_ids[0]), b


def test_sampling_is_reproducible_with_a_seed():
    _, engine = shared()
    ps = prompts()
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.95)
    a = engine.generate(ps, seed=7, **kw)
    b = engine.generate(ps, seed=7, **kw)
    c = engine.generate(ps, seed=8, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    greedy = engine.generate(ps, max_new_tokens=NEW, temperature=0)
    assert not torch.equal(a.completion_ids, greedy.completion_ids)


def test_top_k_one_is_greedy():
    _, engine = shared("tiny-llama")
    ps = prompts()
    greedy = engine.generate(ps, max_new_tokens=NEW, temperature=0)
    for seed in (0, 1):
        top1 = engine.generate(ps, max_new_tokens=NEW, temperature=0.8, top_k=1, seed=seed)
        assert torch.equal(top1.completion_ids, greedy.completion_ids)


def test_sample_tokens_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    tok, _ = sample_tokens(logits, 1.0, top_k=2, generator=gen)
    assert set(tok.tolist()) == {0, 1}
    # probabilities ~ .64 .23 .09 ...: top_p 0.8 keeps the first two (0.64 < 0.8 <= 0.87)
    tok, _ = sample_tokens(logits, 1.0, top_p=0.8, generator=gen)
    assert set(tok.tolist()) == {0, 1}
    tok, _ = sample_tokens(logits, 1.0, top_p=0.5, generator=gen)
    assert set(tok.tolist()) == {0}
    tok, lp = sample_tokens(logits, 2.0, generator=gen)
    assert len(set(tok.tolist())) == 5
    torch.testing.assert_close(lp, (logits / 2.0).log_softmax(-1).gather(-1, tok[:, None])[:, 0])
    freq0 = (tok == 0).float().mean().item()
    assert abs(freq0 - (logits[0] / 2).softmax(-1)[0].item()) < 0.05


def test_eos_and_stop_tokens_end_sequences_with_masks():
    _, engine = shared()
    ps = prompts()
    free = engine.generate(ps, max_new_tokens=NEW, temperature=0)
    eos = int(free.completion_ids[0, 3])
    stop = int(free.completion_ids[1, 5])
    for kwargs in ({"eos_token_id": eos, "stop_token_ids": [stop]}, {"eos_token_id": [stop, eos]}):
        out = engine.generate(ps, max_new_tokens=NEW, temperature=0, **kwargs)
        for b in range(len(ps)):
            row = free.completion_ids[b].tolist()
            hits = [i for i, t in enumerate(row) if t in (eos, stop)]
            n = hits[0] + 1 if hits else NEW
            assert out.completion_lengths[b] == n
            assert out.completion_ids[b, :n].tolist() == row[:n]
            assert out.completion_mask[b, :n].tolist() == [1] * n
            assert not out.completion_mask[b, n:].any()
            assert (out.completion_ids[b, n:] == engine.pad_token_id).all()
            assert (out.logprobs[b, n:] == 0).all() and (out.logprobs[b, :n] < 0).all()
        assert out.completion_ids.shape[1] == int(out.completion_lengths.max())
    # every sequence stops at once: the completion is one token, the decode loop ends early
    firsts = sorted({int(free.completion_ids[b, 0]) for b in range(len(ps))})
    out = engine.generate(ps, max_new_tokens=40, temperature=0, eos_token_id=firsts)
    assert out.completion_ids.shape == (len(ps), 1) and out.completion_lengths.tolist() == [1, 1, 1]
    assert out.decode_steps < 40


def test_logprobs_match_a_reference_forward():
    model, engine = shared("tiny-qwen2", lora=True)
    ps = prompts()
    for temperature, top_k in ((0.7, 20), (0.0, 0)):
        out = engine.generate(ps, max_new_tokens=NEW, temperature=temperature, top_k=top_k, seed=3)
        t = temperature or 1.0
        for b, p in enumerate(ps):
            n = int(out.completion_lengths[b])
            comp = out.completion_ids[b, :n]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + comp.tolist()])).logits[0].float()
            ref = (logits[len(p) - 1:-1] / t).log_softmax(-1).gather(-1, comp[:, None])[:, 0]
            torch.testing.assert_close(out.logprobs[b, :n], ref, rtol=1e-4, atol=1e-4)
        assert out.logprobs.dtype == torch.float32


def _filtered_logprobs(logits, temperature, top_k, top_p):
    """log_softmax of the distribution sampled from: logits / T, the top_k largest, then the smallest
    prefix (by probability) whose mass reaches top_p; plain PyTorch, one row at a time."""
    out = []
    for row in logits / temperature:
        keep = torch.ones_like(row, dtype=torch.bool)
        if top_k:
            keep &= row >= torch.topk(row, top_k).values[-1]
        probs = torch.where(keep, row, float("-inf")).softmax(-1)
        order = probs.argsort(descending=True)
        mass_before = probs[order].cumsum(0) - probs[order]
        drop = torch.zeros_like(keep)
        drop[order] = mass_before >= top_p
        out.append(torch.where(keep & ~drop, row, float("-inf")).log_softmax(-1))
    return torch.stack(out)


@pytest.mark.parametrize("graph_sampling", [False, True])
def test_sampling_logprobs_are_the_sampled_distributions(graph_sampling):
    """RolloutOutput.sampling_logprobs: the drawn token's log-prob under the top-k / top-p truncated,
    renormalized distribution (vLLM's processed_logprobs); equal to logprobs without a filter."""
    model, engine = shared("tiny-qwen2", lora=True, variant="graph_sampling" if graph_sampling else "baseline")
    ps = prompts()
    for temperature, top_k, top_p in ((0.7, 20, 1.0), (1.3, 0, 0.6), (0.9, 12, 0.8), (0.8, 0, 1.0)):
        out = engine.generate(ps, max_new_tokens=NEW, temperature=temperature, top_k=top_k, top_p=top_p, seed=5)
        assert out.sampling_logprobs.shape == out.logprobs.shape and out.sampling_logprobs.dtype == torch.float32
        if top_k == 0 and top_p == 1.0:
            assert torch.equal(out.sampling_logprobs, out.logprobs)
        else:  # the truncated distribution puts more mass on each kept token
            assert (out.sampling_logprobs >= out.logprobs - 1e-6).all()
            assert (out.sampling_logprobs > out.logprobs + 1e-3).any()
        for b, p in enumerate(ps):
            n = int(out.completion_lengths[b])
            comp = out.completion_ids[b, :n]
            assert (out.sampling_logprobs[b, n:] == 0).all()
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + comp.tolist()])).logits[0].float()[len(p) - 1:-1]
            ref = _filtered_logprobs(logits, temperature, top_k, top_p).gather(-1, comp[:, None])[:, 0]
            assert torch.isfinite(ref).all()  # every drawn token is inside the filter
            torch.testing.assert_close(out.sampling_logprobs[b, :n], ref, rtol=1e-4, atol=1e-4)


def test_sleep_wake_round_trips_and_is_idempotent():
    model = make_model("tiny")
    engine = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False)
    region = engine.region
    assert region is not None and engine.is_awake
    ptrs = [t.data_ptr() for t in engine.cache.k + engine.cache.v]
    base = region.base_address
    assert all(base <= p < base + region.nbytes for p in ptrs)
    storages = {t.untyped_storage().data_ptr() for t in engine.cache.k + engine.cache.v}
    assert len(storages) == len(ptrs), "each K/V tensor needs its own storage (no aliased compile inputs)"
    ps = prompts()
    ref = engine.generate(ps, max_new_tokens=NEW, temperature=0)
    for _ in range(3):
        engine.sleep()
        engine.sleep()
        assert not engine.is_awake and not region.is_awake
        with pytest.raises(RuntimeError, match="asleep"):
            engine.generate(ps, max_new_tokens=NEW, temperature=0)
        engine.wake()
        engine.wake()
        assert engine.is_awake and region.is_awake
        assert [t.data_ptr() for t in engine.cache.k + engine.cache.v] == ptrs
        assert torch.equal(engine.generate(ps, max_new_tokens=NEW, temperature=0).completion_ids,
                           ref.completion_ids)
    plain = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False, kv_region=False)
    assert plain.region is None
    plain.sleep(), plain.wake()
    assert torch.equal(plain.generate(ps, max_new_tokens=NEW, temperature=0).completion_ids,
                       ref.completion_ids)


@pytest.mark.parametrize("variant", ["baseline", "all"])
def test_optimizer_step_is_seen_without_sync(variant):
    model = make_model("tiny-llama", lora=True)
    engine = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False,  # built before training
                           **VARIANTS[variant])
    ps = prompts()
    before = engine.generate(ps, max_new_tokens=NEW, temperature=0)

    lora_step(model)

    after = engine.generate(ps, max_new_tokens=NEW, temperature=0)
    assert model.training, "generate restores the trainer's train mode"
    assert not torch.equal(before.completion_ids, after.completion_ids)
    model.eval()
    for b, p in enumerate(ps):
        assert after.completion_ids[b].tolist() == hf_greedy(model, p, NEW), b


def test_bad_requests_raise():
    _, engine = shared()
    with pytest.raises(ValueError, match="max_len"):
        engine.generate([[1] * 40], max_new_tokens=10)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="token id"):
        engine.generate([[1, 999]], max_new_tokens=2)
    assert default_buckets(1) == [1] and default_buckets(2) == [2] and default_buckets(6) == [2, 4, 6]
    assert default_buckets(32) == [2, 4, 8, 16, 32]


def test_sampling_params_validate():
    assert SamplingParams(4, eos_token_id=[7, 3], stop_token_ids=[3, 9]).validate(max_len=8) == [3, 7, 9]
    assert SamplingParams(8, temperature=0, top_k=5, top_p=1.0, eos_token_id=2).validate(max_len=8) == [2]
    for kwargs, reason in (({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
                           ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
                           ({"max_new_tokens": 9}, "max_len"), ({"temperature": -0.5}, "temperature")):
        with pytest.raises(ValueError, match=reason):
            SamplingParams(**{"max_new_tokens": 4, **kwargs}).validate(max_len=8)
    with pytest.raises(ValueError, match="top_k"):  # check_generate_args checks the same fields
        check_generate_args([[1, 2]], 4, -1, 1.0, max_len=8, vocab_size=16)
    with pytest.raises(Exception):  # frozen
        SamplingParams(4).top_k = 2
    _, engine = shared()
    assert isinstance(engine, RolloutBackend)


@pytest.mark.parametrize("scope,fused", [("step", False), ("layer", False), ("layer", True)],
                         ids=["step", "layer", "layer-fused"])
@pytest.mark.parametrize("graph_sampling", [False, True], ids=["host-sampling", "graph-sampling"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "per-bucket"])
def test_compiled_decode_matches_eager(monkeypatch, request, dynamic, graph_sampling, scope, fused):
    """The engine's compiled path (fullgraph dynamo; one symbolic-batch compile or one per bucket).
    Inductor is replaced by dynamo's eager backend to keep the test fast on CPU; test_decode.py compiles with
    Inductor."""
    import torch._dynamo.utils


    model, eager = shared("tiny")
    torch._dynamo.reset()  # dynamo's cache for decode_step is per code object: start (and end) clean
    request.addfinalizer(torch._dynamo.reset)
    torch._dynamo.utils.counters.clear()
    if fused:
        model = make_model("tiny", lora=True)  # a model of its own: fusing re-points its parameters
        eager = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False)
    compiled = RolloutEngine(model, max_batch=4, max_len=48, compile_options={}, compile_backend="eager", dynamic_batch=dynamic,
                             graph_sampling=graph_sampling, compile_scope=scope, fused_projections=fused)
    assert compiled.buckets == [2, 4] and compiled._warm == {2, 4}
    assert compiled.dynamic_batch == dynamic
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    per_fn = 1 if dynamic else 2
    # the step (or the one layer function every layer shares), and with graph_sampling the greedy and
    # temperature samplers, compiled at construction
    assert graphs == per_fn * (3 if graph_sampling else 1)
    ps = prompts()
    kws = [dict(temperature=0)]
    if graph_sampling:  # the compiled samplers trace with fullgraph=True
        kws += [dict(temperature=0.9, seed=4), dict(temperature=0.5, seed=1)]
    for kw in kws:
        for subset in (ps, ps[:2], ps[:1]):  # bucket 4 (one row padded), 2, 2 (one row padded)
            a = compiled.generate(subset, max_new_tokens=NEW, **kw)
            b = eager.generate(subset, max_new_tokens=NEW, **kw)
            assert torch.equal(a.completion_ids, b.completion_ids)
            torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "no recompiles while generating"


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2"])
def test_graph_sampling_matches_host_sampling(name):
    """The sampler inside the step (static buffers, one code path per decode step) gives the very
    tokens, masks and log-probs of the host-side loop: same RNG stream, same stop handling."""
    model = make_model(name, lora=True)
    host = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False)
    graph = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False, graph_sampling=True)
    ps = prompts(7)  # two chunks: buckets 4 and 4 (one row padded)
    free = host.generate(ps, max_new_tokens=NEW, temperature=0)
    eos, stop = int(free.completion_ids[0, 3]), int(free.completion_ids[1, 5])
    firsts = sorted({int(t) for t in free.completion_ids[:, 0]})
    cases = [dict(temperature=0), dict(temperature=0.7, seed=3), dict(temperature=1.0, top_p=0.9, seed=5),
             dict(temperature=0.8, top_k=20, seed=1), dict(temperature=1.2, top_k=5, top_p=0.8, seed=9),
             dict(temperature=0, eos_token_id=eos, stop_token_ids=[stop]),
             dict(temperature=1.0, seed=2, eos_token_id=[eos, 5]),
             dict(temperature=0, eos_token_id=firsts, max_new_tokens=40),  # all stop at once: early exit
             dict(temperature=0, stop_token_ids=list(range(100, 140)) + [eos])]  # > MAX_GRAPH_STOPS: host path
    for kw in cases:
        kw = {"max_new_tokens": NEW, **kw}
        a, b = host.generate(ps, **kw), graph.generate(ps, **kw)
        for field in ("completion_ids", "completion_mask", "logprobs", "completion_lengths"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (kw, field)
        assert a.decode_steps == b.decode_steps, kw
    assert {k for _, k in graph._sample_ready} >= {("greedy",), ("sample",), ("filtered", 0, 0.9)}
    # unseeded sampling follows torch's global seed
    torch.manual_seed(11)
    x = graph.generate(ps, max_new_tokens=NEW, temperature=1.0)
    torch.manual_seed(11)
    y = graph.generate(ps, max_new_tokens=NEW, temperature=1.0)
    assert torch.equal(x.completion_ids, y.completion_ids)


def _bench_rollout():
    """benchmarks/bench_rollout.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rollout.py"
    spec = importlib.util.spec_from_file_location("bench_rollout", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_rollout_smoke(tmp_path):
    """benchmarks/bench_rollout.py --smoke: the benchmark's logic end to end on CPU."""
    import json

    bench = _bench_rollout()
    out = tmp_path / "rollout.json"
    assert bench.main(["--smoke", "--skip-hf", "--repeats", "1", "--keep-caches", "--variants", "all,baseline",
                       "--with-8b", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert run["model"] == "tiny" and run["bound"]["bound_ms_per_step"] > 0
    assert [e["variant"] for e in run["engines"]] == ["baseline", "all"], "unfused variants run first"
    for engine in run["engines"]:
        assert "error" not in engine, engine.get("error")
        assert engine["repeats"][0]["tokens"] == 4 * 16 and engine["same_tokens_after_sleep_wake"]
    assert run["engines"][1]["engine_kwargs"]["graph_sampling"] is True
    assert run["engines"][1]["agreement_with_first_variant"]["token_equal_frac"] == 1.0
    assert result["variant_8b"] in ("baseline", "all") and len(result["runs"]) == 2
    assert [e["variant"] for e in result["runs"][1]["engines"]] == [result["variant_8b"]]
    assert result["versions"]["torch"] == torch.__version__
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.parse_args(["--out", str(out), "--variants", "fused+flash"])


def test_compiled_prefill_decodes_as_transformers_does():
    """compile_prefill: the first generate compiles the prefill (dynamo, batch and prompt length
    symbolic); ragged prompts, a batch of one and more prompts than max_batch decode as before."""
    model = shared_model("tiny-llama", True)
    engine = RolloutEngine(model, max_batch=4, max_len=48, compile_options={}, compile_backend="eager",
                           compile_prefill=True)
    assert engine.compile_prefill and engine.decoder._prefill_fn is not None
    for ps in (prompts(), prompts(1, seed=5), prompts(6, seed=9)):
        out = engine.generate(ps, max_new_tokens=NEW, temperature=0)
        for b, p in enumerate(ps):
            assert out.completion_ids[b].tolist() == hf_greedy(model, p, NEW), f"sequence {b}"
    eager = RolloutEngine(model, max_batch=4, max_len=48, compile_options=False, compile_prefill=True)
    assert not eager.compile_prefill and eager.decoder._prefill_fn is None  # nothing compiles without options


def test_bench_rollout_lora_rows_packed_beside_per_member(tmp_path):
    """bench_rollout --lora-rank: the packed adapters' row and its per-member baseline decode the same."""
    import json

    bench = _bench_rollout()
    out = tmp_path / "rollout.json"
    assert bench.main(["--smoke", "--skip-hf", "--repeats", "1", "--keep-caches", "--lora-rank", "4",
                       "--variants", "fused,fused+per_member_lora", "--out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["lora_rank"] == 4
    rows = run["engines"]
    assert [r["engine_kwargs"].get("pack_lora", True) for r in rows] == [True, False]
    assert rows[1]["agreement_with_first_variant"]["token_equal_frac"] == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the CUDA KV region need a GPU")
def test_cuda_graphs_survive_sleep_wake_and_optimizer_steps():
    model = make_model("tiny-llama", lora=True).cuda()
    engine = RolloutEngine(model, max_batch=8, max_len=48, compile_options={})
    eager = RolloutEngine(model, max_batch=8, max_len=48, compile_options=False, use_cuda_graphs=False)
    # one graph per bucket: with the sampler inside (graph_sampling, the CUDA default) or without
    captured = set(engine._graphs) | {b for b, _ in engine._sample_graphs}
    assert captured == {2, 4, 8} and not eager._graphs and not eager._sample_graphs
    assert engine.region.device.type == "cuda"
    ps = prompts(5)
    ref = engine.generate(ps, max_new_tokens=NEW, temperature=0)
    assert torch.equal(ref.completion_ids, eager.generate(ps, max_new_tokens=NEW, temperature=0).completion_ids)
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    engine.sleep()
    assert torch.cuda.mem_get_info()[0] - free_awake >= engine.region.nbytes * 0.99
    engine.wake()
    engine.wake()
    assert torch.equal(engine.generate(ps, max_new_tokens=NEW, temperature=0).completion_ids,
                       ref.completion_ids)
    sampled = [engine.generate(ps, max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=5).completion_ids
               for _ in range(2)]
    assert torch.equal(*sampled)

    model.train()
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.SGD(lora_params, lr=0.5)
    batch = torch.randint(0, 256, (2, 16), device="cuda")
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    engine.sleep()  # as the trainer would: KV memory released during the step, graphs kept
    engine.wake()
    after = engine.generate(ps, max_new_tokens=NEW, temperature=0)
    assert not torch.equal(after.completion_ids, ref.completion_ids)
    assert torch.equal(after.completion_ids, eager.generate(ps, max_new_tokens=NEW, temperature=0).completion_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the CUDA KV region need a GPU")
@pytest.mark.parametrize("pack_lora", [True, False], ids=["packed", "per-member"])
def test_cuda_graphs_refuse_adapters_changed_since_capture(pack_lora):
    """The captured graphs read the adapters (packed or not) they were captured with: generating
    with them disabled is refused in one line, and works again once they are back."""
    model = make_model("tiny-llama", lora=True).cuda()
    engine = RolloutEngine(model, max_batch=4, max_len=48, compile_options={}, pack_lora=pack_lora)
    assert engine._sample_graphs
    ps = prompts(3)
    ref = engine.generate(ps, max_new_tokens=NEW, temperature=0)
    with model.disable_adapter():
        with pytest.raises(RuntimeError, match="captured its CUDA graphs"):
            engine.generate(ps, max_new_tokens=NEW, temperature=0)
    assert torch.equal(engine.generate(ps, max_new_tokens=NEW, temperature=0).completion_ids, ref.completion_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the CUDA KV region need a GPU")
@pytest.mark.parametrize("variant", ["all", "fused-triton-gs"])
@pytest.mark.parametrize("scope", ["step", "layer"])
def test_cuda_graph_sampling_variant(scope, variant):
    """Every speed option at once on CUDA: fused projections, SDPA decode attention, the sampler inside
    the graph (graph-safe RNG on the engine's generator), against the same options run eagerly."""
    model = make_model("tiny-qwen2", lora=True).cuda()
    kw = dict(VARIANTS[variant])
    engine = RolloutEngine(model, max_batch=8, max_len=48, compile_options={}, compile_scope=scope, **kw)
    eager = RolloutEngine(model, max_batch=8, max_len=48, compile_options=False, use_cuda_graphs=False, **kw)
    assert {b for b, _ in engine._sample_graphs} == {2, 4, 8} and not engine._graphs
    assert engine.graph_error is None
    ps = prompts(5)
    ref = engine.generate(ps, max_new_tokens=NEW, temperature=0)
    assert torch.equal(ref.completion_ids, eager.generate(ps, max_new_tokens=NEW, temperature=0).completion_ids)
    for extra in ({}, {"top_p": 0.9}, {"top_k": 20}):
        a = engine.generate(ps, max_new_tokens=NEW, temperature=1.0, seed=5, **extra)
        b = engine.generate(ps, max_new_tokens=NEW, temperature=1.0, seed=5, **extra)
        c = engine.generate(ps, max_new_tokens=NEW, temperature=1.0, seed=6, **extra)
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
        assert not torch.equal(a.completion_ids, c.completion_ids)
    engine.sleep()
    engine.wake()
    assert torch.equal(engine.generate(ps, max_new_tokens=NEW, temperature=0).completion_ids, ref.completion_ids)
    logits = engine.decode(torch.tensor([1, 2, 3], device="cuda"), torch.tensor([0, 1, 2], device="cuda"))
    assert logits.shape == (3, model.config.vocab_size) and 4 in engine._graphs  # captured on first use

    model.train()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=0.5)
    batch = torch.randint(0, 256, (2, 16), device="cuda")
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    after = engine.generate(ps, max_new_tokens=NEW, temperature=0)
    assert not torch.equal(after.completion_ids, ref.completion_ids)
    assert torch.equal(after.completion_ids, eager.generate(ps, max_new_tokens=NEW, temperature=0).completion_ids)


def test_compiled_engine_ignores_the_trainers_embedding_hook(monkeypatch, request):
    """Gradient checkpointing's ``enable_input_require_grads`` hooks the embedding with a
    ``requires_grad_`` call; the fullgraph-compiled decode step must not trace through it."""
    import torch._dynamo

    from compilepass.standby.training.checkpointing import enable_checkpointing

    torch._dynamo.reset()
    request.addfinalizer(torch._dynamo.reset)
    model = make_model("tiny", lora=True)
    eager = RolloutEngine(model, max_batch=2, max_len=32, compile_options=False)
    ref = eager.generate(prompts()[:2], max_new_tokens=4, temperature=0).completion_ids
    enable_checkpointing(model.get_base_model())
    calls = []
    model.get_base_model().model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    compiled = RolloutEngine(model, max_batch=2, max_len=32, compile_options={}, compile_backend="eager")
    assert torch.equal(compiled.generate(prompts()[:2], max_new_tokens=4, temperature=0).completion_ids, ref)
    # torch 2.11's dynamo refuses the hook's requires_grad_() (newer ones trace it): never run the hooks
    assert calls == []


def test_default_compile_options_come_from_the_tuning_database(monkeypatch, tmp_path):
    """Without compile_options the engine compiles with what compilepass.selection returns for this model:
    here a user-database winner recorded for this very environment and model; COMPILEPASS_AUTOTUNE=0
    gives torch's defaults."""
    from test_db import make_result

    from compilepass.core.env import current_environment
    from compilepass.db import add_entries, entry_from_tune_result

    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(tmp_path))
    env = current_environment().to_dict()
    win = {"size_asserts": False}
    result = make_result(env=env, model="tiny", batch=4, prompt_len=16, new_tokens=32, winner=win)
    result["workload"]["dtype"] = "float32"
    add_entries(tmp_path / "tuning_db.json", [entry_from_tune_result(result, date="2030-01-01T00:00:00Z")])
    model = shared_model("tiny")
    engine = RolloutEngine(model, max_batch=4, max_len=48, warmup=False)
    assert engine.compile_options == win
    monkeypatch.setenv("COMPILEPASS_AUTOTUNE", "0")
    assert RolloutEngine(model, max_batch=4, max_len=48, warmup=False).compile_options == {}

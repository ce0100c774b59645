"""Native rollout engine vs transformers' static-cache generate, same process, same device.

Random weights with a published model's shape (speed depends only on the shape), bf16, greedy,
no EOS (every sequence runs max_new_tokens). Measures, per model:

1. transformers ``model.generate(..., cache_implementation="static", do_sample=False,
   max_new_tokens=N, min_new_tokens=N)`` — it compiles itself: first call (compile) and warm calls;
2. ``RolloutEngine`` once per variant (``--variants``, each with every ``--flags`` set): cold
   start (construction = KV region + compile + CUDA-graph capture of every batch bucket), one
   untimed generate, then ``--repeats`` timed generates: tok/s (B*N / wall time of generate,
   prefill included, like the baseline) and ms per decode step (decode time / steps: sampling
   and Python overhead included); ``--warm-start`` adds a second construction after
   ``torch._dynamo.reset()`` (on-disk caches warm);
3. the memory-bandwidth bound of one decode step: (weights read + KV read) / ``--bandwidth``
   (3.0e12 B/s, measured device-to-device copy on the H100), KV read = the whole static cache
   (max_len positions; the step masks, it does not skip);
4. ratios: ours / transformers (tok/s, same run) and ms-per-step / bound.

A variant is engine options joined by "+": ``baseline`` (none), ``fused`` (fused q/k/v and gate/up
projections), ``sdpa`` / ``sdpa_gqa`` / ``triton`` (decode attention; ``triton`` reads each sequence's cache only
up to its length), ``graph_sampling`` (sampler and
bookkeeping inside the step's CUDA graph), ``layer`` (regional compilation), ``per_bucket`` (one
static compile per bucket), ``eager`` (no compile), ``nf4`` (a copy of the model with NF4 base weights,
bitsandbytes' 4-bit matmul, fused projections off: issue 17's 4-bit decode beside the 16-bit rows),
``nf4_triton`` (the same through our NF4 kernel, ``COMPILEPASS_NF4_MATMUL=triton``),
``per_member_lora`` (with ``--lora-rank``: the unpacked LoRA path of session 11, ``pack_lora=False``,
the baseline of the packed adapters), ``compiled_prefill`` (the prefill compiled regionally too, on the
first generate: ``first_generate_s`` holds that compile, ``prefill_s_median`` the gain), ``merged_lora``
(with ``--lora-rank``: the adapters merged into the base weights for each generate and the base restored
from a host copy after, ``merge_lora=True``; ``total_s`` includes that restore);
``all`` = ``fused+sdpa+graph_sampling``.
Variants without ``fused`` run first (fusing re-points the model's parameters for the rest of
the process). ``--with-8b`` then runs qwen3-8b shapes at ``--batch-8b`` with the transformers
baseline and the fastest 0.6b variant (or ``--variant-8b``).

Fresh Inductor and Triton cache directories are used (set before torch is imported), so the first
engine's cold start is a real compile. Later variants whose step graph was compiled before in this
process (e.g. ``fused+graph_sampling`` after ``fused``) hit the FX-graph / AOT caches: each row
records the cache hits during its construction (``compile_cache``) and the table marks such warm
cold starts with ``~``. ``--keep-caches`` uses the user's caches instead.

    python benchmarks/bench_rollout.py --with-8b --out benchmarks/results/rollout_variants_h100_<date>.json
    python benchmarks/bench_rollout.py --smoke --out /tmp/rollout_smoke.json   # CPU, tiny, seconds
    python benchmarks/bench_rollout.py --lora-rank 32 --batch 64 --skip-hf \
        --variants fused+triton+graph_sampling+layer,fused+triton+graph_sampling+layer+per_member_lora --out ...

``--lora-rank R`` puts a peft LoRA adapter on every linear layer (alpha 2R, B drawn at random so
that it changes the tokens; peft's float32 adapters, as GRPO trains them): GRPO's generation.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

T0 = time.perf_counter()
TUNED = {"combo_kernels": True, "coordinate_descent_tuning": True, "max_autotune": True,
         "max_autotune_pointwise": True, "triton.multi_kernel": 1}
DEFAULT_FLAGS = ["{}"]
#: engine options per variant token (see the module docstring)
VARIANT_TOKENS = {
    "baseline": {},
    "fused": {"fused_projections": True},
    "matmul": {"attention": "matmul"},
    "sdpa": {"attention": "sdpa"},
    "sdpa_gqa": {"attention": "sdpa_gqa"},
    "triton": {"attention": "triton"},
    "graph_sampling": {"graph_sampling": True},
    "gs": {"graph_sampling": True},
    "layer": {"compile_scope": "layer"},
    "per_bucket": {"dynamic_batch": False},
    "eager": {},
    "nf4": {"nf4": True},
    "nf4_triton": {"nf4": True, "nf4_matmul": "triton"},
    "per_member_lora": {"pack_lora": False},
    "compiled_prefill": {"compile_prefill": True},
    "merged_lora": {"merge_lora": True},
}
_NF4_MODELS: dict = {}


def nf4_copy(model):
    """A copy of ``model`` whose linear layers (not lm_head) are NF4 with double quantization
    (:func:`compilepass.core.quantize.quantize_linears`, as ``model.load_in_4bit`` builds a preset):
    the 4-bit rows of issue 17 beside the 16-bit ones, on the same weights. One copy per model."""
    import copy

    from compilepass.core.quantize import quantize_linears

    key = id(model)
    if key not in _NF4_MODELS:
        _NF4_MODELS[key] = quantize_linears(copy.deepcopy(model), compute_dtype=next(model.parameters()).dtype)
    return _NF4_MODELS[key]
ALL = "fused+sdpa+graph_sampling"
DEFAULT_VARIANTS = "baseline,fused,fused+sdpa,fused+graph_sampling,all,all+layer"


def variant_options(name: str) -> tuple[dict, bool]:
    """(RolloutEngine keyword arguments, eager?) of a variant name such as ``fused+sdpa``."""
    kwargs, eager = {}, False
    for tok in name.replace("all", ALL).split("+"):
        tok = tok.strip()
        if tok not in VARIANT_TOKENS:
            raise SystemExit(f"unknown variant token {tok!r} in {name!r}; known: {', '.join(VARIANT_TOKENS)}, all")
        kwargs.update(VARIANT_TOKENS[tok])
        eager = eager or tok == "eager"
    return kwargs, eager


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--flags", nargs="*", default=None,
                   help="compile option sets as JSON objects (or 'tuned' for "
                        f"{json.dumps(TUNED)}), or 'eager' for no compile (default: {{}})")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated engine variants (default: {DEFAULT_VARIANTS})")
    p.add_argument("--repeats", type=int, default=5, help="timed engine generates per variant")
    p.add_argument("--lora-rank", type=int, default=0, help="a LoRA adapter of this rank on every linear layer")
    p.add_argument("--hf-repeats", type=int, default=3, help="timed warm transformers generates")
    p.add_argument("--skip-hf", action="store_true", help="no transformers baseline")
    p.add_argument("--warm-start", action="store_true",
                   help="also measure a second construction after torch._dynamo.reset() (caches warm)")
    p.add_argument("--no-warm-start", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--with-8b", action="store_true", help="also qwen3-8b shapes at --batch-8b")
    p.add_argument("--batch-8b", type=int, default=64)
    p.add_argument("--variant-8b", default=None,
                   help="engine variant for qwen3-8b (default: the fastest variant of the first model)")
    p.add_argument("--hf-repeats-8b", type=int, default=2)
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="device copy bandwidth, bytes/s")
    p.add_argument("--keep-caches", action="store_true", help="use the existing Inductor/Triton caches")
    p.add_argument("--per-bucket-compile", action="store_true",
                   help="engine: one static compile per batch bucket instead of one dynamic-batch compile")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="first model: skip the remaining variants (and warm starts) once this much wall time "
                        "has passed, so that --with-8b still fits")
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset, batch 4, prompt 16, 16 tokens, fp32 (CPU if no GPU), eager engine")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.prompt_len, args.new_tokens = "tiny", 4, 16, 16
        args.repeats, args.hf_repeats, args.hf_repeats_8b = 2, 1, 1
        if args.flags is None:
            args.flags = ["eager"]
    if args.flags is None:
        args.flags = list(DEFAULT_FLAGS)
    args.flags = [json.dumps(TUNED) if f == "tuned" else f for f in args.flags]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in names:
        variant_options(v)  # unknown tokens: one clear error before any work
    # fusing re-points the model's parameters for the rest of the process: unfused variants first
    args.variant_list = sorted(names, key=lambda v: "fused" in v.replace("all", ALL).split("+"))
    if args.variant_8b is not None:
        variant_options(args.variant_8b)
    return args


def _fresh_caches() -> str:
    root = tempfile.mkdtemp(prefix="bench_rollout_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(root, "triton")
    return root


def versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda}
    for name in ("triton", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth_bound(model, shape, batch: int, max_len: int, kv_itemsize: int, bandwidth: float) -> dict:
    """Bytes one decode step must read: every weight once (the embedding table only through the
    tied lm_head; an untied table is read at B rows only) and the whole static KV cache."""
    weights = 0
    embed = model.get_input_embeddings().weight
    for p in model.parameters():
        if p is embed and not shape.tie_word_embeddings:
            continue
        weights += p.numel() * p.element_size()
    kv = 2 * shape.num_layers * batch * shape.num_kv_heads * max_len * shape.head_dim * kv_itemsize
    return {"weights_bytes": weights, "kv_bytes": kv, "bandwidth_Bps": bandwidth,
            "bound_ms_per_step": (weights + kv) / bandwidth * 1e3}


def run_hf(model, prompts, new_tokens: int, repeats: int, device) -> dict:
    import torch

    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, cache_implementation="static", do_sample=False, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=0)
    B, P = ids.shape
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        sync(device)
        times.append(time.perf_counter() - t0)
    n = out.shape[1] - P
    med = statistics.median(times)
    return {"first_call_s": first, "warm_call_s": times, "new_tokens": n, "tokens": out[:, P:].cpu(),
            "tok_per_s": [B * n / t for t in times], "tok_per_s_median": B * n / med,
            "ms_per_step_median": med / n * 1e3}


def _cache_counters() -> dict:
    from torch._dynamo.utils import counters

    return {"fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
            "aot_autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"]}


def _compile_time_totals() -> dict:
    """Seconds spent so far in each of dynamo's timed compile phases (this process)."""
    from torch._dynamo.utils import compilation_time_metrics

    return {k: float(sum(v)) for k, v in compilation_time_metrics.items()}


def run_engine(model, prompts, new_tokens: int, flags, engine_kwargs: dict, repeats: int, warm_start, device,
               dynamic_batch: bool = True) -> dict:
    """:func:`_run_engine` with ``COMPILEPASS_NF4_MATMUL`` set for the variant (``nf4_triton``), then restored."""
    from compilepass.standby.rollout.linear4bit import MATMUL_ENV

    engine_kwargs = dict(engine_kwargs)
    backend = engine_kwargs.pop("nf4_matmul", None)
    before = os.environ.get(MATMUL_ENV)
    if backend:
        os.environ[MATMUL_ENV] = backend
    try:
        row = _run_engine(model, prompts, new_tokens, flags, engine_kwargs, repeats, warm_start, device, dynamic_batch)
    finally:
        if before is None:
            os.environ.pop(MATMUL_ENV, None)
        else:
            os.environ[MATMUL_ENV] = before
    if backend:
        row["nf4_matmul"] = backend
    return row


def _run_engine(model, prompts, new_tokens: int, flags, engine_kwargs: dict, repeats: int, warm_start, device,
                dynamic_batch: bool = True) -> dict:
    import torch

    from compilepass.standby.rollout.engine import RolloutEngine

    B = len(prompts)
    max_len = max(len(p) for p in prompts) + new_tokens
    options = False if flags == "eager" else flags
    kwargs = {"dynamic_batch": dynamic_batch, **engine_kwargs}
    if kwargs.pop("nf4", False):
        model = nf4_copy(model)
        kwargs["fused_projections"] = False
    gc.collect()
    sync(device)
    before, phases_before = _cache_counters(), _compile_time_totals()
    t0 = time.perf_counter()
    engine = RolloutEngine(model, max_batch=B, max_len=max_len, compile_options=options, persistent_compile=False,
                           **kwargs)
    sync(device)
    cold = time.perf_counter() - t0
    after, phases_after = _cache_counters(), _compile_time_totals()
    cache = {k: after[k] - before[k] for k in after}
    phases = {k: round(v - phases_before.get(k, 0.0), 4) for k, v in phases_after.items()
              if v - phases_before.get(k, 0.0) > 0.05}
    row = {"flags": flags, "engine_kwargs": kwargs, "cold_start_s": cold, "compile_s": engine.compile_s,
           "capture_s": engine.capture_s, "compile_cache": cache, "compile_phases_s": phases,
           "cold_compile": None if options is False else cache["fxgraph_cache_hit"] + cache["aot_autograd_cache_hit"] == 0,
           "buckets": engine.buckets, "graphs": sorted(engine._graphs),
           "sampler_graphs": sorted(f"{b}:{k[0]}" for b, k in engine._sample_graphs),
           "graph_error": engine.graph_error, "dynamic_batch": engine.dynamic_batch,
           "kv_region_bytes": engine.region.nbytes if engine.region is not None else None}
    first = engine.generate(prompts, max_new_tokens=new_tokens, temperature=0)
    row["first_generate_s"] = first.total_s
    reps = []
    for _ in range(repeats):
        out = engine.generate(prompts, max_new_tokens=new_tokens, temperature=0)
        n_tok = int(out.completion_lengths.sum())
        reps.append({"total_s": out.total_s, "prefill_s": out.prefill_s, "decode_s": out.decode_s,
                     "decode_steps": out.decode_steps, "tokens": n_tok, "tok_per_s": n_tok / out.total_s,
                     "ms_per_step": out.decode_s / max(out.decode_steps, 1) * 1e3})
    row["repeats"] = reps
    row["tok_per_s_median"] = statistics.median(r["tok_per_s"] for r in reps)
    row["ms_per_step_median"] = statistics.median(r["ms_per_step"] for r in reps)
    row["prefill_s_median"] = statistics.median(r["prefill_s"] for r in reps)
    row["tokens"] = out.completion_ids.cpu()
    # sleep / wake once and check that the graphs still give the same tokens
    engine.sleep()
    engine.wake()
    again = engine.generate(prompts, max_new_tokens=new_tokens, temperature=0)
    row["same_tokens_after_sleep_wake"] = bool(torch.equal(again.completion_ids, out.completion_ids))
    if device.type == "cuda":
        row["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    engine.close()
    del engine, first, out, again
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if options is not False and warm_start():
        torch._dynamo.reset()
        t0 = time.perf_counter()
        engine = RolloutEngine(model, max_batch=B, max_len=max_len, compile_options=options, persistent_compile=False,
                           **kwargs)
        sync(device)
        row["warm_start_s"] = time.perf_counter() - t0
        engine.close()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def agreement(a, b) -> dict:
    """How far two greedy token sets agree (bf16 numerics differ between implementations)."""
    import torch

    same = a == b
    prefix = torch.where(same.all(1), same.shape[1], (~same).float().argmax(1))
    return {"first_token_equal_frac": float(same[:, 0].float().mean()), "token_equal_frac": float(same.float().mean()),
            "mean_equal_prefix": float(prefix.float().mean())}


def bench_model(args, name: str, batch: int, device, dtype, result: dict, save, variants: list[str],
                hf_repeats: int, budget_check: bool = True) -> dict:
    import torch

    from compilepass.core.models import build_model
    from compilepass.core.shapes import ModelShape

    print(f"== {name}: batch {batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, {dtype}, "
          f"{device_name(device)}", flush=True)
    model = build_model(name, dtype=dtype, device=device, seed=0)
    if args.lora_rank:
        from compilepass.core.models import add_lora

        model = add_lora(model, rank=args.lora_rank, alpha=2 * args.lora_rank, init_random=True, seed=0)
    shape = ModelShape.from_hf_config(model.config)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, shape.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
    max_len = args.prompt_len + args.new_tokens
    entry = {"model": name, "random_weights": True, "lora_rank": args.lora_rank, "batch": batch, "prompt_len": args.prompt_len,
             "new_tokens": args.new_tokens, "dtype": str(dtype).replace("torch.", ""),
             "bound": bandwidth_bound(model, shape, batch, max_len, torch.empty((), dtype=dtype).element_size(),
                                      args.bandwidth),
             "engines": []}
    result["runs"].append(entry)
    hf_tokens = None
    if not args.skip_hf:
        try:
            hf = run_hf(model, prompts, args.new_tokens, hf_repeats, device)
            hf_tokens = hf.pop("tokens")
            entry["transformers"] = hf
            print(f"   transformers static generate: first call {hf['first_call_s']:.1f} s, "
                  f"{hf['tok_per_s_median']:.0f} tok/s ({hf['ms_per_step_median']:.2f} ms/step)", flush=True)
        except Exception as exc:  # the baseline failing must not lose the engine's numbers
            entry["transformers"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"   transformers generate failed: {exc}", flush=True)
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    base_tokens = None
    for variant in variants:
        engine_kwargs, eager_variant = variant_options(variant)
        for f in (["eager"] if eager_variant else args.flags):
            if budget_check and time.perf_counter() - T0 > args.budget_s:
                print(f"   engine {variant} {f}: skipped (past --budget-s {args.budget_s:.0f})", flush=True)
                entry["engines"].append({"variant": variant, "flags": f, "skipped": "past --budget-s"})
                continue
            flags = "eager" if f == "eager" else json.loads(f)
            label = variant if f == "{}" else f"{variant} {f}"
            try:
                def warm_start():
                    if not args.warm_start:
                        return False
                    if time.perf_counter() - T0 > args.budget_s:
                        print(f"   (warm start skipped: past --budget-s {args.budget_s:.0f})", flush=True)
                        return False
                    return True

                row = run_engine(model, prompts, args.new_tokens, flags, engine_kwargs, args.repeats, warm_start,
                                 device, dynamic_batch=not args.per_bucket_compile)
            except Exception as exc:
                import traceback

                row = {"variant": variant, "flags": flags, "error": traceback.format_exc()[-3000:]}
                print(f"   engine {label} failed: {exc}", flush=True)
                entry["engines"].append(row)
                save()
                continue
            row = {"variant": variant, **row}
            tokens = row.pop("tokens")
            if hf_tokens is not None:
                row["agreement_with_transformers"] = agreement(tokens, hf_tokens)
                hf_tps = entry["transformers"].get("tok_per_s_median")
                if hf_tps:
                    row["ratio_vs_transformers"] = row["tok_per_s_median"] / hf_tps
                    row["ratio_ms_per_step_vs_transformers"] = (
                        entry["transformers"]["ms_per_step_median"] / row["ms_per_step_median"])
            if base_tokens is None:
                base_tokens, row["agreement_with_first_variant"] = tokens, None
            else:
                row["agreement_with_first_variant"] = agreement(tokens, base_tokens)
            row["ratio_ms_per_step_vs_bound"] = row["ms_per_step_median"] / entry["bound"]["bound_ms_per_step"]
            entry["engines"].append(row)
            cache = " (compile caches warm)" if row["cold_compile"] is False else ""
            print(f"   engine {label}: cold start {row['cold_start_s']:.1f} s{cache} (compile {row['compile_s']:.1f}, "
                  f"capture {row['capture_s']:.2f}), {row['tok_per_s_median']:.0f} tok/s, "
                  f"{row['ms_per_step_median']:.3f} ms/step, "
                  f"x{row.get('ratio_vs_transformers', float('nan')):.2f} vs transformers", flush=True)
            save()
    del model
    torch._dynamo.reset()  # compiled steps refer to the model's modules: let them go
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def best_variant(entry: dict):
    """The variant (with torch's default flags) of the lowest median ms/step in ``entry``."""
    rows = [r for r in entry["engines"] if "ms_per_step_median" in r and r.get("flags") in ({}, "eager")]
    if not rows:
        return None
    return min(rows, key=lambda r: r["ms_per_step_median"])["variant"]


def print_table(result: dict) -> None:
    print()
    head = f"{'model':<12} {'what':<44} {'cold s':>7} {'warm s':>7} {'tok/s':>9} {'ms/step':>8} {'x HF':>6} {'x bound':>7}"
    print(head)
    print("-" * len(head))
    for run in result["runs"]:
        bound = run["bound"]["bound_ms_per_step"]
        hf = run.get("transformers") or {}
        if "tok_per_s_median" in hf:
            print(f"{run['model']:<12} {'transformers static generate':<44} {hf['first_call_s']:>7.1f} {'':>7} "
                  f"{hf['tok_per_s_median']:>9.0f} {hf['ms_per_step_median']:>8.3f} {1.0:>6.2f} "
                  f"{hf['ms_per_step_median'] / bound:>7.2f}")
        for row in run["engines"]:
            flags = row.get("flags")
            what = "engine " + row.get("variant", "") + ("" if flags in ({}, "{}", None) else " " + json.dumps(flags))
            if "error" in row or "skipped" in row:
                print(f"{run['model']:<12} {what[:44]:<44} {'failed' if 'error' in row else 'skipped'}")
                continue
            cold = f"{'~' if row.get('cold_compile') is False else ''}{row['cold_start_s']:.1f}"
            print(f"{run['model']:<12} {what[:44]:<44} {cold:>7} {row.get('warm_start_s', float('nan')):>7.1f} "
                  f"{row['tok_per_s_median']:>9.0f} {row['ms_per_step_median']:>8.3f} "
                  f"{row.get('ratio_vs_transformers', float('nan')):>6.2f} {row['ratio_ms_per_step_vs_bound']:>7.2f}")
        print(f"{run['model']:<12} {'bandwidth bound':<44} {'':>7} {'':>7} "
              f"{run['batch'] / bound * 1e3:>9.0f} {bound:>8.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cache_root = None if args.keep_caches else _fresh_caches()
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and not args.smoke else torch.float32
    result = {"benchmark": "rollout", "command": " ".join([sys.executable, *sys.argv]),
              "device": device_name(device), "versions": versions(), "random_weights": True,
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "inductor_cache": "fresh temporary directories" if cache_root else "user's caches",
              "runs": []}
    out_path = args.out

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, out_path)

    first = bench_model(args, args.model, args.batch, device, dtype, result, save, args.variant_list, args.hf_repeats)
    if args.with_8b:
        variant = args.variant_8b or best_variant(first)
        result["variant_8b"] = variant
        if variant is None:
            print("   (qwen3-8b skipped: no engine variant of the first model succeeded)", flush=True)
        else:
            bench_model(args, "tiny" if args.smoke else "qwen3-8b", args.batch_8b if not args.smoke else args.batch,
                        device, dtype, result, save, [variant], args.hf_repeats_8b, budget_check=False)
    result["wall_s"] = time.perf_counter() - T0
    save()
    print_table(result)
    print(f"\nwrote {out_path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

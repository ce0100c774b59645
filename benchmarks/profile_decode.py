"""Where does a decode step of the rollout engine spend its time? Kernel counts and the top kernels (GPU).

Builds a ``RolloutEngine`` for one variant (the same names as ``bench_rollout.py --variants``), runs
one untimed greedy generate, then profiles one more: kernels and GPU time per decode step (the
prefill's kernels are included, amortized over the steps) and the top kernels. ``--no-graphs``
profiles the compiled step without CUDA graphs (what the graphs replay, launch by launch).

    python benchmarks/profile_decode.py --variant all --out /tmp/profile_all.json
    python benchmarks/profile_decode.py --lora-rank 32 --batch 64 --out /tmp/profile_lora.json   # GRPO's shape

``--lora-rank R`` puts a peft LoRA adapter (rank R, alpha 2R, every linear layer, B random as after
training) on the model first, as the GRPO loop's generation runs it.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from compilepass.core.models import add_lora, build_model
from compilepass.standby.rollout.engine import RolloutEngine


def _variant_options(name: str):
    path = Path(__file__).resolve().parent / "bench_rollout.py"
    spec = importlib.util.spec_from_file_location("bench_rollout", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.variant_options(name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--variant", default="baseline")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--flags", default="{}", help="Inductor options as JSON")
    p.add_argument("--no-graphs", action="store_true", help="run the compiled step without CUDA graphs")
    p.add_argument("--lora-rank", type=int, default=0, help="a LoRA adapter of this rank on every linear layer")
    p.add_argument("--per-member-lora", action="store_true",
                   help="the unpacked LoRA path of session 11 (pack_lora=False), the packed adapters' baseline")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    kwargs, eager = _variant_options(args.variant)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.model, dtype=dtype, device=device, seed=0)
    vocab = model.config.vocab_size
    if args.lora_rank:
        model = add_lora(model, rank=args.lora_rank, alpha=2 * args.lora_rank, init_random=True, seed=0)
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    engine = RolloutEngine(model, max_batch=args.batch, max_len=args.prompt_len + args.new_tokens,
                           compile_options=False if eager else json.loads(args.flags),
                           use_cuda_graphs=not args.no_graphs, pack_lora=not args.per_member_lora, **kwargs)
    engine.generate(prompts, max_new_tokens=args.new_tokens, temperature=0)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        out = engine.generate(prompts, max_new_tokens=args.new_tokens, temperature=0)
    steps = max(out.decode_steps, 1)
    events = prof.key_averages()
    dev_type = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    rows = sorted((e for e in events if e.device_type == dev_type), key=lambda e: -e.device_time_total)
    total_us = sum(e.device_time_total for e in rows)
    launches = sum(e.count for e in rows)
    result = {"model": args.model, "variant": args.variant, "engine_kwargs": kwargs, "graphs": not args.no_graphs,
              "lora_rank": args.lora_rank, "pack_lora": not args.per_member_lora,
              "batch": args.batch, "decode_steps": out.decode_steps,
              "ms_per_step_wall": out.decode_s / steps * 1e3, "cold_start_s": engine.cold_start_s,
              "kernels_per_step": launches / steps, "gpu_us_per_step": total_us / steps,
              "top": [{"name": e.key[:120], "count_per_step": e.count / steps, "us_per_step": e.device_time_total / steps}
                      for e in rows[:30]]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.variant}: {result['ms_per_step_wall']:.3f} ms/step wall, kernels/step {result['kernels_per_step']:.0f}, "
          f"GPU us/step {result['gpu_us_per_step']:.0f} (prefill included, amortized)")
    for r in result["top"][:15]:
        print(f"{r['us_per_step']:9.1f} us  x{r['count_per_step']:5.1f}  {r['name']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Engine start in a new process: cold (empty compile caches) vs warm (the caches a previous process left),
warm with the persisted compiled layer (``precompiled``) and warm through Inductor's caches alone (``fx``).

Each start is its own ``python`` process that builds a random-weight model and a ``RolloutEngine``
with its defaults and reports ``cold_start_s`` (construction: KV region, compile, CUDA-graph capture
of every batch bucket and sampler), dynamo's timed compile phases and the FX-graph / AOT-autograd
cache counters; then one greedy generate whose tokens every start must reproduce. The first start
gets fresh ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` directories; the ``--warm`` later
starts reuse them (what a user's second ``compilepass grpo`` run sees). The ``--warm`` starts run
twice over, in the same call: with the engine's persistent compile (torch's AOT precompile: the
compiled layer loaded from ``COMPILEPASS_CACHE_DIR/precompiled``, no dynamo trace) and with
``COMPILEPASS_PRECOMPILE=0`` (dynamo traces again, Inductor's FX / AOT-autograd caches hit): the
baseline. Nothing is stored in the tuning database: the caches are torch's and ours, on disk.

    python benchmarks/bench_warm_start.py --out $OUT/warm_start.json              # GPU: qwen3-0.6b
    python benchmarks/bench_warm_start.py --smoke --out /tmp/warm_start_smoke.json  # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from bench_common import add_rollout_shape_args, dist_version

CHILD = r"""
import json, sys, time
t_proc = time.perf_counter()
import torch
from torch._dynamo.utils import compilation_time_metrics, counters
from compilepass.core.models import build_model
from compilepass.standby.rollout import persistent_compile
from compilepass.standby.rollout.engine import RolloutEngine

args = json.loads(sys.argv[1])
device = torch.device(args["device"])
dtype = getattr(torch, args["dtype"])
early = False
if args.get("early_workers"):  # as compilepass grpo does: the compile workers boot while the model loads
    from compilepass.standby.rollout.compile import start_compile_workers
    early = start_compile_workers(device, args["compile"])
model = build_model(args["model"], dtype=dtype, device=device, seed=0)
g = torch.Generator().manual_seed(1)
prompts = torch.randint(0, model.config.vocab_size, (args["batch"], args["prompt_len"]), generator=g).tolist()
kwargs = {} if args["compile"] else {"compile_options": False}
if device.type == "cuda":
    torch.cuda.synchronize()
t0 = time.perf_counter()
engine = RolloutEngine(model, max_batch=args["batch"], max_len=args["prompt_len"] + args["new_tokens"],
                       **{"compile_options": {}, **kwargs})
if device.type == "cuda":
    torch.cuda.synchronize()
cold = time.perf_counter() - t0
out = engine.generate(prompts, max_new_tokens=args["new_tokens"], temperature=0)
print(json.dumps({
    "cold_start_s": cold, "compile_s": engine.compile_s, "capture_s": engine.capture_s,
    "early_workers": early, "engine_started_workers": engine.compile_workers,
    "process_to_engine_s": time.perf_counter() - t_proc,
    "compile_phases_s": {k: round(float(sum(v)), 4) for k, v in compilation_time_metrics.items() if sum(v) > 0.05},
    "start_phases_s": {k: round(v, 4) for k, v in engine.start_phases_s.items()},
    "cache": {"fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
              "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
              "aot_autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
              "aot_autograd_miss": counters["aot_autograd"]["autograd_cache_miss"]},
    "precompiled": {"supported": persistent_compile.supported(), "dir": str(engine.persist_dir or ""),
                    "loaded": list(getattr(engine.decoder._layer_fn, "loaded", [])),
                    "compiled": list(getattr(engine.decoder._layer_fn, "compiled", [])),
                    "samplers": {str(k[0][0]): {"loaded": list(getattr(f, "loaded", [])),
                                                "compiled": list(getattr(f, "compiled", []))}
                                 for k, f in engine._post_fns.items() if k[1]}},
    "tokens_per_s": out.tokens_per_s, "first_tokens": out.completion_ids[:2, :8].tolist(),
    "tokens_checksum": int(out.completion_ids.sum()),
}))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rollout_shape_args(p)
    p.add_argument("--warm", type=int, default=3, help="warm starts after the cold one")
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, fp32, small sizes")
    p.add_argument("--early-workers", action="store_true",
                   help="start Inductor's compile workers before the model is built, as compilepass grpo does")
    args = p.parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens", "warm"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    spec = {"model": "tiny" if args.smoke else args.model, "device": "cuda" if cuda else "cpu",
            "dtype": "bfloat16" if cuda else "float32", "batch": 4 if args.smoke else args.batch,
            "prompt_len": 8 if args.smoke else args.prompt_len, "new_tokens": 8 if args.smoke else args.new_tokens,
            "compile": True, "early_workers": bool(args.early_workers)}
    root = tempfile.mkdtemp(prefix="bench_warm_start_")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(root, "inductor"),
               TRITON_CACHE_DIR=os.path.join(root, "triton"), COMPILEPASS_CACHE_DIR=os.path.join(root, "compilepass"),
               PYTHONUNBUFFERED="1")
    env.pop("COMPILEPASS_PRECOMPILE", None)
    starts = []
    head = {"benchmark": "warm_start", "command": " ".join([sys.executable] + sys.argv), "spec": spec}
    # the FX-cache path first (its cold start fills Inductor's caches; an AOT precompile does not), then
    # the precompiled path's own first start (it compiles and saves), then its warm starts
    plan = ([("cold", "0")] + [("warm_fx", "0")] * args.warm + [("cold_precompile", "1")]
            + [("warm", "1")] * args.warm)
    for i, (kind, precompile) in enumerate(plan):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                              env=dict(env, COMPILEPASS_PRECOMPILE=precompile), timeout=900)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"start {i} ({kind}) failed with exit code {proc.returncode}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(kind=kind, process_wall_s=wall, stderr_tail=proc.stderr[-1500:])
        starts.append(row)
        with open(args.out, "w") as f:  # kept if a later process is cut short (a call's time limit)
            json.dump({**head, "complete": False, "starts": starts}, f, indent=2)
        print(f"{row['kind']:>7}: engine {row['cold_start_s']:.2f} s (compile {row['compile_s']:.2f}, capture "
              f"{row['capture_s']:.2f}; phases {row['start_phases_s']}); process {wall:.1f} s; fx cache hit/miss {row['cache']['fxgraph_hit']}/"
              f"{row['cache']['fxgraph_miss']}; precompiled loaded {row['precompiled']['loaded']}"
              f" (samplers: {row['precompiled']['samplers']})", flush=True)
    same = len({s["tokens_checksum"] for s in starts}) == 1
    warm = [s["cold_start_s"] for s in starts if s["kind"] == "warm"]
    warm_fx = [s["cold_start_s"] for s in starts if s["kind"] == "warm_fx"]
    result = {
        **head, "complete": True,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "versions": {"torch": torch.__version__, "triton": dist_version("triton"), "python": platform.python_version()},
        "starts": starts, "cold_start_s": starts[0]["cold_start_s"],
        "cold_precompile_start_s": next(s["cold_start_s"] for s in starts if s["kind"] == "cold_precompile"),
        "warm_start_s": warm, "warm_start_s_median": statistics.median(warm),
        "warm_fx_start_s": warm_fx, "warm_fx_start_s_median": statistics.median(warm_fx),
        "precompile_supported": starts[0]["precompiled"]["supported"], "same_tokens": same,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"cold {result['cold_start_s']:.2f} s (saving the precompiled layer: {result['cold_precompile_start_s']:.2f}"
          f" s), warm median {result['warm_start_s_median']:.2f} s precompiled, {result['warm_fx_start_s_median']:.2f}"
          f" s through the FX cache (of {len(warm)} each), same tokens: {same}; wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

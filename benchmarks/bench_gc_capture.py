"""Benchmark CUDA-graph capture with millions of live Python objects: gc patch off vs on.

    python benchmarks/bench_gc_capture.py                      # on a GPU, < 3 minutes on an H100
    python benchmarks/bench_gc_capture.py --smoke --out /tmp/gc.json   # CPU logic check

This process sets TORCH_CUDAGRAPH_GC=1 *before importing torch*, so torch >= 2.9 runs a full
gc.collect() on every capture, as torch < 2.9 and vLLM's capture do. It builds --objects live,
gc-tracked Python objects (one-element lists), then captures --graphs CUDA graphs of a small op
sequence (fresh graphs every time), --repeats times per mode, modes interleaved:

  unpatched : as is, every capture collects
  patched   : the whole batch of captures inside compilepass.gc_patch.suppress_gc_during_capture
              (force=True), its default entry collection (young generations) and freeze
              inside the timing
  patched_full_entry_collect : the same with collect_first="full" (one full collection on entry)
  patched_no_entry_collect : the same with collect_first="none" (freeze only), which shows what
              the entry collection costs

A third reference, torch's default (TORCH_CUDAGRAPH_GC unset: no per-capture collection), runs
in a child process of this script (--child-default) with the same objects and graphs.
Raw times go to --out as JSON (default $OUT/gc_capture_bench.json); a table is printed.

--smoke runs on CPU with fewer objects: no CUDA graph is captured; each "capture" does what
torch.cuda.graph.__enter__ does about gc (gc.collect() when
torch.compiler.config.force_cudagraph_gc is on) followed by a small CPU op.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ENV = "TORCH_CUDAGRAPH_GC"


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_objects(n: int):
    """``n`` live objects that the collector tracks (lists are always tracked)."""
    keep = [[i] for i in range(n)]
    return keep


class Capturer:
    """Captures one graph of a small op sequence; on CPU (smoke) simulates the capture's gc."""

    def __init__(self, torch, smoke: bool):
        self.torch = torch
        self.smoke = smoke
        device = "cpu" if smoke else "cuda"
        if smoke:  # one thread: keeps CPU-quota throttling of a thread pool out of the timings
            torch.set_num_threads(1)
        gen = torch.Generator(device=device)
        gen.manual_seed(0)
        self.x = torch.randn(256, 256, device=device, generator=gen)
        self.w = torch.randn(256, 256, device=device, generator=gen)
        self.b = torch.randn(256, device=device, generator=gen)
        if not smoke:  # warm up cuBLAS etc. outside capture, on a side stream
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.ops()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
        self.expected = self.ops()

    def ops(self):
        t = self.torch
        y = t.relu(self.x @ self.w + self.b)
        y = t.nn.functional.layer_norm(y, (256,))
        return (y * 0.5).sum(dim=-1)

    def capture_one(self):
        t = self.torch
        if self.smoke:
            if t.compiler.config.force_cudagraph_gc:
                gc.collect()  # the call torch.cuda.graph.__enter__ makes
            return None, self.ops()
        graph = t.cuda.CUDAGraph()
        with t.cuda.graph(graph):
            out = self.ops()
        return graph, out

    def check(self, captured) -> bool:
        graph, out = captured
        if graph is not None:
            graph.replay()
            self.torch.cuda.synchronize()
        return bool(self.torch.allclose(out, self.expected, rtol=1e-4, atol=1e-4))


def run_mode(capturer, n_graphs: int, patched: bool, collect_first="young"):
    from compilepass.gc_patch import suppress_gc_during_capture

    per_graph = []
    info = {}
    graphs = []
    t_start = time.perf_counter()
    if patched:
        with suppress_gc_during_capture(force=True, collect_first=collect_first) as stats:
            for _ in range(n_graphs):
                t0 = time.perf_counter()
                graphs.append(capturer.capture_one())
                per_graph.append(time.perf_counter() - t0)
        info = {
            "entry_collect_s": stats.entry_collect_s,
            "suppressed_full_collects": stats.suppressed_full_collects,
            "froze": stats.froze,
        }
    else:
        for _ in range(n_graphs):
            t0 = time.perf_counter()
            graphs.append(capturer.capture_one())
            per_graph.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_start
    ok = capturer.check(graphs[-1]) and capturer.check(graphs[0])
    del graphs
    return {"total_s": total, "per_graph_s": per_graph, "replay_ok": ok, **info}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def child_default(args) -> int:
    """torch's default (TORCH_CUDAGRAPH_GC unset), in this fresh process; writes JSON."""
    assert ENV not in os.environ, f"{ENV} must be unset in the child"
    import torch

    from compilepass.gc_patch import capture_collects_per_graph

    keep = build_objects(args.objects)
    gc.collect()
    capturer = Capturer(torch, args.smoke)
    runs = [run_mode(capturer, args.graphs, patched=False) for _ in range(args.repeats)]
    collects, reason = capture_collects_per_graph()
    with open(args.child_out, "w") as f:
        json.dump(
            {
                "runs": runs,
                "collects_per_graph": collects,
                "detection": reason,
                "tracked_objects_built": len(keep),
                "force_cudagraph_gc": bool(torch.compiler.config.force_cudagraph_gc),
            },
            f,
        )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=3_000_000, help="live gc-tracked objects (default 3M)")
    ap.add_argument("--graphs", type=int, default=40, help="graphs captured per run (default 40)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per mode (default 3)")
    ap.add_argument("--budget-s", type=float, default=140.0,
                    help="stop adding repeats when the next one would pass this many seconds")
    ap.add_argument("--smoke", action="store_true", help="CPU, fewer objects: logic check only")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gc_capture_bench.json)")
    ap.add_argument("--child-default", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.objects = min(args.objects, 300_000)
        args.graphs = min(args.graphs, 10)
        args.repeats = min(args.repeats, 2)

    if args.child_default:
        return child_default(args)

    t_begin = time.perf_counter()
    torch_was_imported = "torch" in sys.modules
    os.environ[ENV] = "1"  # before importing torch: its config reads the variable at import
    import torch

    from compilepass.gc_patch import capture_collects_per_graph

    if not args.smoke and not torch.cuda.is_available():
        print("CUDA is not available: run with --smoke for the CPU logic check", file=sys.stderr)
        return 2
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "gc_capture_bench.json")
    collects, reason = capture_collects_per_graph()

    result = {
        "benchmark": "gc_capture",
        "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv]),
        "device": "cpu (smoke, capture simulated)" if args.smoke else torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "vllm": _version("vllm"),
        },
        "smoke": args.smoke,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
        "env_set_before_torch_import": not torch_was_imported,
        "force_cudagraph_gc": bool(torch.compiler.config.force_cudagraph_gc),
        "collects_per_graph": collects,
        "detection": reason,
    }

    t0 = time.perf_counter()
    keep = build_objects(args.objects)
    result["build_objects_s"] = time.perf_counter() - t0
    gc.collect()
    result["tracked_objects_built"] = sum(1 for o in keep[:1000] if gc.is_tracked(o)) * len(keep) // 1000
    result["gc_tracked_objects_total"] = len(gc.get_objects())
    single = []
    for _ in range(3):
        t0 = time.perf_counter()
        gc.collect()
        single.append(time.perf_counter() - t0)
    result["single_full_collect_s"] = single

    capturer = Capturer(torch, args.smoke)
    modes = ("unpatched", "patched", "patched_full_entry_collect", "patched_no_entry_collect")
    entry = {"patched": "young", "patched_full_entry_collect": "full", "patched_no_entry_collect": "none"}
    runs = {m: [] for m in modes}
    order_log = []
    for r in range(args.repeats):
        t_rep = time.perf_counter()
        order = modes if r % 2 == 0 else modes[::-1]
        for mode in order:
            runs[mode].append(
                run_mode(capturer, args.graphs, patched=mode != "unpatched",
                         collect_first=entry.get(mode, "young"))
            )
            order_log.append(mode)
        rep_s = time.perf_counter() - t_rep
        elapsed = time.perf_counter() - t_begin
        if r + 1 < args.repeats and elapsed + rep_s > args.budget_s:
            result["stopped_early"] = (
                f"after {r + 1} repeat(s): {elapsed:.0f} s elapsed, one more takes ~{rep_s:.0f} s "
                f"(budget {args.budget_s:.0f} s)"
            )
            break
    result["order"] = order_log
    result["runs"] = runs

    # torch's default, in a fresh process without the variable
    env = {k: v for k, v in os.environ.items() if k != ENV}
    with tempfile.TemporaryDirectory() as tmp:
        child_out = os.path.join(tmp, "child.json")
        cmd = [
            sys.executable, os.path.abspath(__file__), "--child-default", "--child-out", child_out,
            "--objects", str(args.objects), "--graphs", str(args.graphs),
            "--repeats", str(len(runs["patched"])),
        ] + (["--smoke"] if args.smoke else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
            if proc.returncode == 0:
                with open(child_out) as f:
                    result["torch_default"] = json.load(f)
            else:
                result["torch_default"] = {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
        except subprocess.TimeoutExpired:
            result["torch_default"] = {"error": "child timed out after 150 s"}
        result["torch_default_process_s"] = time.perf_counter() - t0
        result["torch_default_command"] = shlex.join(cmd)

    med = {m: _median([x["total_s"] for x in runs[m]]) for m in runs}
    default_runs = result["torch_default"].get("runs", [])
    med["torch_default"] = _median([x["total_s"] for x in default_runs])
    result["median_total_s"] = med
    result["speedup_patched_vs_unpatched"] = med["unpatched"] / med["patched"]
    result["speedup_patched_full_entry_collect_vs_unpatched"] = med["unpatched"] / med["patched_full_entry_collect"]
    result["speedup_patched_no_entry_collect_vs_unpatched"] = med["unpatched"] / med["patched_no_entry_collect"]
    capture_only = {
        m: _median([sum(x["per_graph_s"]) for x in runs[m]]) for m in runs
    }
    result["median_capture_only_s"] = capture_only  # sum of the per-graph times, no entry/exit
    result["speedup_capture_only_patched_vs_unpatched"] = capture_only["unpatched"] / capture_only["patched"]
    result["speedup_torch_default_vs_unpatched"] = med["unpatched"] / med["torch_default"]
    result["patched_vs_torch_default"] = med["patched"] / med["torch_default"]
    result["all_replays_ok"] = all(x["replay_ok"] for m in runs for x in runs[m]) and all(
        x["replay_ok"] for x in default_runs
    )
    result["wall_s"] = time.perf_counter() - t_begin

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)

    print(f"gc during CUDA-graph capture: {result['device']}, torch {torch.__version__}, "
          f"{result['gc_tracked_objects_total']:,} gc-tracked objects, {args.graphs} graphs per run"
          f"{'  [SMOKE: CPU, capture simulated]' if args.smoke else ''}")
    print(f"detection ({ENV}=1): {collects}: {reason}")
    print(f"one full gc.collect(): {_median(single):.3f} s (median of 3)")
    print(f"{'mode':<50}{'runs':>6}{'median s':>12}{'min s':>10}{'max s':>10}")
    rows = [
        (f"unpatched ({ENV}=1)", runs["unpatched"]),
        (f"patched   ({ENV}=1)", runs["patched"]),
        (f"patched, full entry collect ({ENV}=1)", runs["patched_full_entry_collect"]),
        (f"patched, no entry collect ({ENV}=1)", runs["patched_no_entry_collect"]),
        (f"torch default ({ENV} unset)", default_runs),
    ]
    for name, rs in rows:
        totals = [x["total_s"] for x in rs]
        if totals:
            print(f"{name:<50}{len(totals):>6}{_median(totals):>12.4f}{min(totals):>10.4f}{max(totals):>10.4f}")
        else:
            print(f"{name:<50}{0:>6}  {result['torch_default'].get('error', 'no runs')[:60]}")
    print(f"speedup vs unpatched: patched {result['speedup_patched_vs_unpatched']:.1f}x (incl. its young "
          f"entry collection), with a full entry collection "
          f"{result['speedup_patched_full_entry_collect_vs_unpatched']:.1f}x, without entry collection "
          f"{result['speedup_patched_no_entry_collect_vs_unpatched']:.1f}x, capture calls only "
          f"{result['speedup_capture_only_patched_vs_unpatched']:.1f}x")
    print(f"replays ok: {result['all_replays_ok']}   wall {result['wall_s']:.0f} s")
    print(f"wrote {out_path}")
    return 0 if result["all_replays_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

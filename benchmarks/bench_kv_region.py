"""Benchmark the address-stable KV region: memory released by sleep, sleep/wake latency, graphs.

    python benchmarks/bench_kv_region.py --gib 8            # on a GPU, < 2 minutes on an H100
    python benchmarks/bench_kv_region.py --smoke --out /tmp/kv.json   # CPU logic check

What it does (GPU):
1. Creates a KVRegion of --gib GiB and lays out per-layer K and V caches over ~95% of it.
2. Captures one CUDA graph of a fake attention decode step over those caches: per layer,
   write the new token's k/v at a position read from a device tensor (index_copy_ into the
   region), then scores = q @ K^T, softmax, out = p @ V (reads the whole region).
3. Fills the inputs deterministically, replays, keeps the output as the reference.
4. Pins device memory with a "ballast" tensor so that only the region plus --margin-gib stay
   free: the trainer's allocation below then fits only if sleep() really released the region.
5. --repeats sleep/wake pairs: latency of each, cudaMemGetInfo free memory around each.
6. --cycles cycles of: sleep; the trainer allocates --trainer-fraction of the released bytes
   with torch, writes it, frees it and empties torch's cache; wake; refill the inputs the same
   way; replay; the output must be bitwise identical to the reference.
Raw numbers go to --out as JSON (default $OUT/kv_region_bench.json); a short table is printed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from compilepass.standby.memory import KVRegion, free_device_memory

GiB = 1 << 30
MiB = 1 << 20


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class FakeAttention:
    """Static inputs and a decode step over region-backed K/V caches (graph-capturable)."""

    def __init__(self, region: KVRegion, layers: int, batch: int, heads: int, head_dim: int, fill: float):
        self.device = region.device
        self.dtype = torch.bfloat16
        per_token = batch * heads * head_dim * 2  # bytes per (layer, k-or-v) per position
        self.max_len = max(16, int(region.nbytes * fill) // (2 * layers * per_token))
        shape = (batch, heads, self.max_len, head_dim)
        specs = {f"{kind}{i}": (self.dtype, shape) for i in range(layers) for kind in "kv"}
        self.kv = region.carve(specs, align=4096)
        self.layers = layers
        self.kv_bytes = sum(t.numel() * t.element_size() for t in self.kv.values())
        small = (batch, heads, 1, head_dim)
        dev = self.device
        self.q = torch.empty(small, dtype=self.dtype, device=dev)
        self.new_k = [torch.empty(small, dtype=self.dtype, device=dev) for _ in range(layers)]
        self.new_v = [torch.empty(small, dtype=self.dtype, device=dev) for _ in range(layers)]
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.scale = head_dim**-0.5

    def fill_inputs(self, seed: int = 1234) -> None:
        """Deterministic contents for the caches and the step's inputs."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        for t in self.kv.values():
            t.normal_(generator=gen)
        self.q.normal_(generator=gen)
        for t in self.new_k + self.new_v:
            t.normal_(generator=gen)
        self.pos.fill_(self.max_len // 3)

    def step(self) -> torch.Tensor:
        x = self.q
        for i in range(self.layers):
            k, v = self.kv[f"k{i}"], self.kv[f"v{i}"]
            k.index_copy_(2, self.pos, self.new_k[i])
            v.index_copy_(2, self.pos, self.new_v[i])
            scores = torch.matmul(x, k.transpose(-1, -2)).float() * self.scale
            probs = torch.softmax(scores, dim=-1).to(self.dtype)
            x = torch.matmul(probs, v)
        return x

    def cache_written(self) -> bool:
        p = int(self.pos.item())
        return all(
            torch.equal(self.kv[f"k{i}"][:, :, p : p + 1], self.new_k[i])
            and torch.equal(self.kv[f"v{i}"][:, :, p : p + 1], self.new_v[i])
            for i in range(self.layers)
        )


def _capture(attn: FakeAttention):
    """(run, output): run() replays the captured graph (CUDA) or calls the step (CPU)."""
    if attn.device.type != "cuda":
        holder = {}

        def run():
            holder["out"] = attn.step()
            return holder["out"]

        run()
        return run, lambda: holder["out"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            attn.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn.step()

    def run():
        graph.replay()
        return out

    run.graph = graph  # keep it alive
    return run, lambda: out


def _stats(values):
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=8.0, help="region size in GiB (default 8)")
    ap.add_argument("--repeats", type=int, default=20, help="sleep/wake latency repeats")
    ap.add_argument("--cycles", type=int, default=10, help="sleep / trainer / wake / replay cycles")
    ap.add_argument("--trainer-fraction", type=float, default=0.9, help="of the released bytes")
    ap.add_argument("--margin-gib", type=float, default=1.0,
                    help="free memory left beside the region by the ballast (GPU); <0 disables the ballast")
    ap.add_argument("--chunk-mib", type=int, default=None, help="physical chunk size (default: one handle)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="small, on CPU: checks the logic only")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/kv_region_bench.json)")
    args = ap.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        args.gib = min(args.gib, 1 / 16)
        args.repeats = min(args.repeats, 5)
        args.cycles = min(args.cycles, 3)
        args.batch, args.heads, args.head_dim = 2, 2, 16
    else:
        if not torch.cuda.is_available():
            print("CUDA is not available: run with --smoke for the CPU logic check", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "kv_region_bench.json")
    nbytes_req = int(args.gib * GiB)
    chunk = args.chunk_mib * MiB if args.chunk_mib else None
    t_start = time.perf_counter()

    result = {
        "benchmark": "kv_region",
        "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu:{platform.machine()}",
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda-bindings": _version("cuda-bindings") or _version("cuda-python"),
            "python": platform.python_version(),
        },
        "smoke": args.smoke,
        "args": vars(args),
    }

    free0, total = free_device_memory(device)
    t0 = time.perf_counter()
    region = KVRegion(nbytes_req, device, chunk_bytes=chunk)
    create_s = time.perf_counter() - t0
    free_created, _ = free_device_memory(device)
    result["region"] = {
        "nbytes": region.nbytes,
        "granularity": region.granularity,
        "chunk_bytes": region.chunk_bytes,
        "base_address": hex(region.base_address),
        "create_and_map_s": create_s,
        "free_before_create": free0,
        "free_after_create": free_created,
        "total": total,
    }
    gib = region.nbytes / GiB

    # graph over region tensors, and its reference output
    attn = FakeAttention(region, args.layers, args.batch, args.heads, args.head_dim, fill=0.95)
    run, output = _capture(attn)
    attn.fill_inputs()
    run()
    _sync(device)
    reference = output().clone()
    eager_check = None
    if device.type == "cuda":
        attn.fill_inputs()
        eager = attn.step()
        _sync(device)
        eager_check = {
            "bitwise_equal": bool(torch.equal(eager, reference)),
            "max_abs_diff": float((eager.float() - reference.float()).abs().max()),
        }
    result["graph"] = {
        "kv_bytes": attn.kv_bytes,
        "kv_fraction_of_region": attn.kv_bytes / region.nbytes,
        "max_len": attn.max_len,
        "layers": args.layers,
        "captured": device.type == "cuda",
        "graph_vs_eager": eager_check,
    }

    # ballast: leave only the region + margin free, so the trainer fits only after a real release
    ballast = None
    if device.type == "cuda" and args.margin_gib >= 0:
        _empty_cache(device)
        free_now, _ = free_device_memory(device)
        size = free_now - int(args.margin_gib * GiB)
        if size > 0:
            ballast = torch.empty(size, dtype=torch.uint8, device=device)
        result["ballast_bytes"] = size if size > 0 else 0
    else:
        result["ballast_bytes"] = 0

    # sleep / wake latency
    lat = {"sleep_s": [], "wake_s": [], "free_awake": [], "free_asleep": [], "free_rewoken": []}
    for _ in range(args.repeats):
        _sync(device)
        lat["free_awake"].append(free_device_memory(device)[0])
        t0 = time.perf_counter()
        region.sleep()
        lat["sleep_s"].append(time.perf_counter() - t0)
        lat["free_asleep"].append(free_device_memory(device)[0])
        t0 = time.perf_counter()
        region.wake()
        lat["wake_s"].append(time.perf_counter() - t0)
        lat["free_rewoken"].append(free_device_memory(device)[0])
    lat["released_bytes"] = [a - b for a, b in zip(lat["free_asleep"], lat["free_awake"])]
    lat["wake_s_per_gib"] = [w / gib for w in lat["wake_s"]]
    result["latency"] = lat

    # cycles: sleep, the trainer uses the memory, wake, replay bitwise equal
    cycles = []
    base_before = region.base_address
    ptrs_before = {n: t.data_ptr() for n, t in attn.kv.items()}
    for i in range(args.cycles):
        c = {"cycle": i}
        _sync(device)
        c["free_awake"] = free_device_memory(device)[0]
        t0 = time.perf_counter()
        region.sleep()
        c["sleep_s"] = time.perf_counter() - t0
        c["free_asleep"] = free_device_memory(device)[0]
        c["released_bytes"] = c["free_asleep"] - c["free_awake"]
        want = int(args.trainer_fraction * c["released_bytes"]) if device.type == "cuda" else int(
            args.trainer_fraction * region.nbytes)
        c["trainer_bytes"] = want
        c["trainer_fits_only_if_released"] = (
            device.type == "cuda" and ballast is not None and want > c["free_awake"]
        )
        try:
            t0 = time.perf_counter()
            big = torch.empty(want, dtype=torch.uint8, device=device)
            big.fill_(i % 251)
            _sync(device)
            c["trainer_ok"] = bool(big[-1].item() == i % 251)
            c["trainer_s"] = time.perf_counter() - t0
            c["free_during_trainer"] = free_device_memory(device)[0]
            del big
        except torch.OutOfMemoryError as exc:  # a result, not a crash
            c["trainer_ok"] = False
            c["trainer_error"] = str(exc).splitlines()[0]
        _empty_cache(device)
        c["free_after_trainer"] = free_device_memory(device)[0]
        t0 = time.perf_counter()
        region.wake()
        c["wake_s"] = time.perf_counter() - t0
        c["free_rewoken"] = free_device_memory(device)[0]
        attn.fill_inputs()
        t0 = time.perf_counter()
        out = run()
        _sync(device)
        c["replay_s"] = time.perf_counter() - t0
        c["bitwise_equal"] = bool(torch.equal(out, reference))
        c["cache_written_by_graph"] = attn.cache_written()
        c["addresses_stable"] = region.base_address == base_before and all(
            t.data_ptr() == ptrs_before[n] for n, t in attn.kv.items()
        )
        cycles.append(c)
    result["cycles"] = cycles

    granule = region.granularity
    released_ok = [
        abs(r - region.nbytes) <= granule for r in lat["released_bytes"] + [c["released_bytes"] for c in cycles]
    ]
    result["summary"] = {
        "region_gib": gib,
        "sleep_ms": {k: v * 1e3 for k, v in _stats(lat["sleep_s"]).items() if k != "n"},
        "wake_ms": {k: v * 1e3 for k, v in _stats(lat["wake_s"]).items() if k != "n"},
        "wake_ms_per_gib": {k: v * 1e3 for k, v in _stats(lat["wake_s_per_gib"]).items() if k != "n"},
        "released_fraction": {
            k: v / region.nbytes for k, v in _stats(lat["released_bytes"]).items() if k != "n"
        },
        "every_sleep_released_region_within_one_granule": all(released_ok) if device.type == "cuda" else None,
        "cycles_bitwise_equal": sum(c["bitwise_equal"] for c in cycles),
        "cycles_trainer_ok": sum(c["trainer_ok"] for c in cycles),
        "cycles_trainer_fit_only_if_released": sum(c["trainer_fits_only_if_released"] for c in cycles),
        "cycles_addresses_stable": sum(c["addresses_stable"] for c in cycles),
        "cycles": len(cycles),
        "wall_s": time.perf_counter() - t_start,
    }

    del ballast
    region.close()

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)

    s = result["summary"]
    print(f"KV region {gib:.2f} GiB on {result['device']}  (torch {torch.__version__}, "
          f"cuda-bindings {result['versions']['cuda-bindings']}){'  [SMOKE, CPU]' if args.smoke else ''}")
    print(f"{'metric':<28}{'median':>12}{'min':>12}{'max':>12}")
    for key in ("sleep_ms", "wake_ms", "wake_ms_per_gib", "released_fraction"):
        st = s[key]
        print(f"{key:<28}{st['median']:>12.4g}{st['min']:>12.4g}{st['max']:>12.4g}")
    print(f"cycles: {s['cycles']}  bitwise-equal replays: {s['cycles_bitwise_equal']}  "
          f"trainer ok: {s['cycles_trainer_ok']} (fit only because of the release: "
          f"{s['cycles_trainer_fit_only_if_released']})  addresses stable: {s['cycles_addresses_stable']}")
    print(f"every sleep released the region (within one granule): "
          f"{s['every_sleep_released_region_within_one_granule']}   wall {s['wall_s']:.1f} s")
    print(f"wrote {out_path}")
    ok = s["cycles_bitwise_equal"] == s["cycles"] == s["cycles_addresses_stable"] == s["cycles_trainer_ok"]
    ok = ok and s["every_sleep_released_region_within_one_granule"] is not False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

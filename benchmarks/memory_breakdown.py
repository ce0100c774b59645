"""Where a run's device memory goes: any ``compilepass`` command under the CUDA allocator's history.

    python3 benchmarks/memory_breakdown.py --summary out.json -- bench context --model qwen3-8b ...

Records every allocation and free of the command (``torch.cuda.memory._record_memory_history``,
Python stacks only), then replays the trace and writes, for the moment the live bytes peaked and for
every out-of-memory event, the live blocks grouped by the allocation site (the innermost frame outside
torch, with the innermost torch frame beside it). The raw snapshot is large (every event with its
stack), so only the summary is written unless ``--snapshot`` names a file for it.

Memory mapped outside the torch allocator (the native engine's KV region, mapped with the CUDA driver;
a device-memory cap's hold) is not in the trace: the summary says so and the command's own JSON
records both.

Known limit: on torch 2.11 recording the history breaks the backward of activation-checkpointed models
(``SystemError: <built-in method apply of FunctionMeta object> returned NULL``, pytorch/pytorch#179536,
a regression since 2.10); session 13's ``bench context`` under this tool hit it on the H200
(``benchmarks/results/context_qwen3-8b_native_mb1_cap80_memory-history-crash_h200_2026-12-03.log``).
Use it there for generation or for runs without checkpointing until torch fixes it.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from collections import defaultdict
from typing import Iterable, Optional

_OURS = ("compilepass/", "transformers/", "peft/", "benchmarks/")


def allocation_site(frames: list) -> tuple[str, str]:
    """(innermost frame in our code or a model library, innermost torch frame) of one trace entry."""
    ours = torch_frame = ""
    for f in frames or ():
        where = f"{f.get('filename', '?')}:{f.get('line', '?')} {f.get('name', '?')}"
        name = f.get("filename", "")
        if not torch_frame and "/torch/" in name:
            torch_frame = where
        if not ours and any(k in name for k in _OURS) and "/torch/" not in name:
            ours = where
        if ours and torch_frame:
            break
    return ours or "(no frame outside torch)", torch_frame


def _shorten(where: str) -> str:
    for key in ("site-packages/", "/work/main/", "/root/"):
        if key in where:
            return where.split(key, 1)[1]
    return where


def replay(trace: Iterable[dict], top: int = 25) -> dict:
    """Live bytes over one device's trace: the peak and every ``oom`` event, each with its top sites.

    Entries are the allocator's (``action`` alloc / free_requested / free_completed / oom / segment_*);
    a block counts from its ``alloc`` to its ``free_completed`` (or ``free_requested`` when the trace
    holds no completions)."""
    trace = list(trace)
    completes = any(e.get("action") == "free_completed" for e in trace)
    free_action = "free_completed" if completes else "free_requested"
    live: dict[int, tuple[int, tuple[str, str]]] = {}
    total = peak = 0
    peak_live: dict = {}
    ooms: list[dict] = []

    def group(blocks: dict) -> list[dict]:
        by_site: dict = defaultdict(lambda: [0, 0])
        for size, site in blocks.values():
            by_site[site][0] += size
            by_site[site][1] += 1
        rows = sorted(by_site.items(), key=lambda kv: -kv[1][0])[:top]
        return [{"gib": round(b / 2**30, 3), "blocks": n, "site": _shorten(s[0]), "torch_frame": _shorten(s[1])}
                for s, (b, n) in rows]

    for e in trace:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = (int(e["size"]), allocation_site(e.get("frames")))
            total += int(e["size"])
            if total > peak:
                peak, peak_live = total, dict(live)
        elif action == free_action:
            size, _ = live.pop(e["addr"], (0, None))
            total -= size
        elif action == "oom":
            ooms.append({"live_gib": round(total / 2**30, 3), "requested_gib": round(int(e.get("size", 0)) / 2**30, 3),
                         "device_free_gib": round(int(e.get("device_free", 0)) / 2**30, 3),
                         "at": _shorten(allocation_site(e.get("frames"))[0]), "sites": group(live)})
    return {"events": len(trace), "peak_live_gib": round(peak / 2**30, 3), "peak_sites": group(peak_live),
            "ooms": ooms}


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summary", required=True, help="JSON summary file")
    p.add_argument("--snapshot", default=None, help="also pickle the raw snapshot here (large)")
    p.add_argument("--max-entries", type=int, default=1_000_000, help="trace entries kept (the allocator's ring)")
    p.add_argument("--top", type=int, default=25, help="sites listed per moment")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the compilepass command line")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("name the compilepass command after --")
    import torch

    if not torch.cuda.is_available():
        print("memory_breakdown: the allocator's history needs CUDA; this machine has none", file=sys.stderr)
        return 2
    from compilepass.cli.app import main as compilepass_main

    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                             max_entries=args.max_entries)
    t0 = time.perf_counter()
    try:
        rc = compilepass_main(command)
    finally:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    traces = snapshot.get("device_traces") or [[]]
    result = {"command": command, "exit": rc, "wall_s": round(time.perf_counter() - t0, 1),
              "max_entries": args.max_entries, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__,
              "not_in_trace": "memory mapped with the CUDA driver outside the torch allocator (the native engine's "
                              "KV region, a device-memory cap's hold)",
              "devices": [replay(t, args.top) for t in traces]}
    result["trace_may_be_truncated"] = any(d["events"] >= args.max_entries for d in result["devices"])
    with open(args.summary, "w") as f:
        json.dump(result, f, indent=1)
    if args.snapshot:
        with open(args.snapshot, "wb") as f:
            pickle.dump(snapshot, f)
    for d in result["devices"]:
        print(f"peak live {d['peak_live_gib']} GiB over {d['events']} events; {len(d['ooms'])} out-of-memory events")
        for row in d["peak_sites"][:12]:
            print(f"  {row['gib']:8.3f} GiB {row['blocks']:6d} blocks  {row['site']}  [{row['torch_frame']}]")
    return rc


if __name__ == "__main__":
    sys.exit(main())

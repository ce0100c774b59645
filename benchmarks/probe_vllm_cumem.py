"""What vLLM's cumem pool holds after start, as the KV-only release sees it (a diagnostic, CUDA only).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/probe_vllm_cumem.py --out $OUT/cumem_probe.json

Starts ``vllm.LLM`` with sleep mode on a small random-weight Qwen3 (bf16, head size 128), then
writes: every cumem allocation (address, size, tag), torch's memory-snapshot segments (address,
size, pool, live blocks), the model runner's KV-cache storage ranges, and
:func:`compilepass.standby.rollout.vllm.kv_release.plan_release`'s decision (what would be released,
what kept and why), plus the gate's strategy for this vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from compilepass.core.shapes import ModelShape
    from compilepass.standby.rollout.vllm.gates import kv_release_strategy
    from compilepass.standby.rollout.vllm.internals import vllm_model_runner
    from compilepass.standby.rollout.vllm.kv_release import kv_storage_ranges, plan_release

    shape = ModelShape(num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=4, head_dim=128, intermediate_size=1024,
                       vocab_size=4096, family="qwen3", tie_word_embeddings=True, max_position_embeddings=4096)
    folder = tempfile.mkdtemp(prefix="probe-cumem-")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(shape.to_hf_config(), dtype=torch.bfloat16).save_pretrained(folder)
    import vllm
    from vllm.device_allocator.cumem import CuMemAllocator

    t0 = time.perf_counter()
    llm = vllm.LLM(model=folder, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=1024, max_num_seqs=16,
                   enable_sleep_mode=True, kv_cache_memory_bytes=256 << 20, enable_prefix_caching=False,
                   gpu_memory_utilization=0.5, load_format="safetensors")
    start_s = time.perf_counter() - t0
    runner = vllm_model_runner(llm)
    torch.cuda.synchronize()
    alloc = CuMemAllocator.get_instance()
    allocations = [(int(ptr), int(d.handle[1]), d.tag) for ptr, d in alloc.pointer_to_data.items()]
    snapshot = torch.cuda.memory_snapshot()
    kv = kv_storage_ranges(runner)
    plan = plan_release(allocations, snapshot, kv)
    segs = [{"address": int(s["address"]), "total_size": int(s["total_size"]),
             "pool": str(s.get("segment_pool_id")), "segment_type": s.get("segment_type"),
             "live_blocks": sum(1 for b in s.get("blocks", []) if b.get("state") != "inactive")} for s in snapshot]
    tagged = {int(a) for a, _, _ in allocations}
    result = {
        "vllm": vllm.__version__, "torch": torch.__version__, "start_s": start_s,
        "strategy": kv_release_strategy(vllm),
        "allocations": [{"address": a, "size": s, "tag": t, "in_snapshot": any(x["address"] == a for x in segs)}
                        for a, s, t in allocations],
        "snapshot_segments_in_cumem": [s for s in segs if s["address"] in tagged],
        "snapshot_segment_count": len(segs),
        "kv_ranges": [[lo, hi] for lo, hi in kv], "kv_tensors": len(kv),
        "plan": {"release": plan.release, "release_bytes": plan.release_bytes,
                 "kept": {str(k): v for k, v in plan.kept.items()}, "kv_bytes": plan.kv_bytes,
                 "kv_bytes_covered": plan.kv_bytes_covered},
        "has_post_kv_cache_wake_up": hasattr(runner, "post_kv_cache_wake_up"),
        "has_release_kv_cache_memory": hasattr(vllm.LLM, "release_kv_cache_memory"),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("vllm", "start_s", "strategy", "kv_tensors", "plan")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

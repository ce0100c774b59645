"""Where does a compiled decode step spend its time? Kernel counts and the top kernels (GPU)."""

import argparse
import json

import torch

from compilepass.workloads import RolloutWorkload, WorkloadSpec

p = argparse.ArgumentParser()
p.add_argument("--model", default="qwen3-0.6b")
p.add_argument("--out", required=True)
p.add_argument("--flags", default='{"triton.cudagraphs": false}')
args = p.parse_args()
wl = RolloutWorkload(WorkloadSpec(kind="rollout", model=args.model, batch=32, prompt_len=128, new_tokens=16))
wl.prepare()
runner = wl.runner(json.loads(args.flags))
runner.first_calls()
runner.unit()
steps = len(wl.positions)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    runner.unit()
events = prof.key_averages()
cuda_rows = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                   key=lambda e: -e.device_time_total)
total_us = sum(e.device_time_total for e in cuda_rows)
launches = sum(e.count for e in cuda_rows)
out = {"steps": steps, "kernel_launches_per_step": launches / steps, "gpu_us_per_step": total_us / steps,
       "top": [{"name": e.key[:120], "count_per_step": e.count / steps, "us_per_step": e.device_time_total / steps}
               for e in cuda_rows[:25]]}
json.dump(out, open(args.out, "w"), indent=2)
print(f"kernels/step {out['kernel_launches_per_step']:.0f}  GPU us/step {out['gpu_us_per_step']:.0f}")
for r in out["top"][:15]:
    print(f"{r['us_per_step']:9.1f} us  x{r['count_per_step']:5.1f}  {r['name']}")

"""Quick check of the rollout workload on a GPU: a few isolated trials, printed and saved."""

import argparse
import json

from compilepass.core.workload_spec import WorkloadSpec
from compilepass.tuning.trial import TrialSpec, run_trial

p = argparse.ArgumentParser()
p.add_argument("--model", default="qwen3-0.6b")
p.add_argument("--out", required=True)
p.add_argument("--flags", nargs="*", default=["{}", '{"triton.cudagraphs": true}'])
p.add_argument("--repeats", type=int, default=3)
args = p.parse_args()
wl = WorkloadSpec(kind="rollout", model=args.model, batch=32, prompt_len=128, new_tokens=256)
rows = []
for f in args.flags:
    r = run_trial(TrialSpec(wl, json.loads(f), repeats=args.repeats, timeout_s=400))
    rows.append(r.to_dict())
    print(f, r.status, r.compile_s, r.throughput, r.error_tail[-1500:] if not r.ok else "", flush=True)
json.dump({"workload": wl.to_dict(), "trials": rows}, open(args.out, "w"), indent=2)

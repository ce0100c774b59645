"""GRPO step time with standby on vs off, one trainer, one process, interleaved.

One :class:`GRPOTrainer` (random-weight preset, bf16, the built-in ``repeat`` task, the native
engine) runs ``--pairs`` pairs of steps; within each pair one step has ``generation.standby``
on (the KV region is mapped before generation and released after it, so training runs with the
region's memory free) and one has it off (the region stays mapped throughout, as in a stack
without standby). The order alternates per pair (on/off, off/on, ...) so that drifts and the
slow change of the policy affect both modes alike. Both steps of a pair train on the same prompts
with the same sampling seed (the data position is rewound and the step number repeated), so the
two differ only in standby (and the one optimizer update between them). Before every step, untimed:
``gc.collect()``, and the region is put in the state the mode starts from (asleep for on, so that
every on-step pays its wake; awake for off). With random weights the completions run to
``max_completion_len`` (EOS is rarely drawn); the recorded completion lengths show it.

Reported: every step's wall time and phases (gen / reward / train), the region's wake and sleep
times, the paired ratio on/off of step time with a 95% t-interval (target: <= 1.01), peak memory.

    python benchmarks/bench_standby_step.py --model qwen3-0.6b --out benchmarks/results/standby_step_<dev>_<date>.json
    python benchmarks/bench_standby_step.py --smoke --out /tmp/standby_step.json   # CPU, tiny, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion-len", type=int, default=512)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (compile, allocator warm-up)")
    p.add_argument("--compile", default="auto", choices=["auto", "eager"])
    p.add_argument("--micro-batch-size", type=int, default=0, help="optim.micro_batch_size (0 = automatic)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, short (checks the script only)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import compilepass
    from compilepass.standby.grpo.config import default_config, load_config
    from compilepass.standby.grpo.trainer import GRPOTrainer
    from compilepass.tuning.stats import paired_ratio_ci, summarize

    if args.smoke:
        args.model, args.completion_len, args.pairs, args.warmup_steps = "tiny", 8, 2, 1
        args.prompts_per_step, args.generations, args.compile = 2, 2, "eager"
    cuda = torch.cuda.is_available() and not args.smoke
    out_dir = tempfile.mkdtemp(prefix="standby-step-")
    overrides = [
        f"model.name_or_path={args.model}", f"model.dtype={'bfloat16' if cuda else 'float32'}",
        "model.gradient_checkpointing=true", "model.init_std=null",
        f"generation.num_generations={args.generations}", f"generation.max_completion_len={args.completion_len}",
        f"data.prompts_per_step={args.prompts_per_step}",
        f"run.device={'cuda' if cuda else 'cpu'}", f"run.output_dir={out_dir}",
        f"run.max_steps={args.warmup_steps + 2 * args.pairs}", "run.save_every=0",
        f"optim.micro_batch_size={args.micro_batch_size}",
    ]
    config = load_config(None, overrides, base=default_config("tiny"))
    trainer = GRPOTrainer(config, progress=False, compile_options="auto" if args.compile == "auto" else False)
    region = trainer.engine.region
    steps = []
    wake_s, sleep_s = [], []
    if region is not None:  # time the region's own calls (the only work standby adds to a step)
        orig_wake, orig_sleep = region.wake, region.sleep

        def timed(fn, sink):
            def call(*a, **k):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                r = fn(*a, **k)
                if cuda:
                    torch.cuda.synchronize()
                sink.append(time.perf_counter() - t)
                return r
            return call

        region.wake, region.sleep = timed(orig_wake, wake_s), timed(orig_sleep, sleep_s)

    def run_step(step: int, standby: bool, timed_step: bool) -> dict:
        trainer.config.generation.standby = standby
        if standby:
            trainer.engine.sleep()  # on: every step starts asleep and pays its own wake
        else:
            trainer.engine.wake()  # off: mapped before the step and kept mapped through training
        gc.collect()
        n_wake, n_sleep = len(wake_s), len(sleep_s)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        rec = trainer.train_step(step)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        trainer.step = step
        return {"step": step, "index": len(steps) + 1, "standby": standby, "timed": timed_step, "wall_s": wall,
                "gen_s": rec["gen_s"], "reward_s": rec["reward_s"], "train_s": rec["train_s"],
                "completion_len": rec["completions/mean_length"], "peak_mem_gib": rec["peak_mem_gib"],
                "wake_s": sum(wake_s[n_wake:]), "sleep_s": sum(sleep_s[n_sleep:])}

    step = 0
    try:
        for i in range(args.warmup_steps):
            step += 1
            steps.append(run_step(step, i % 2 == 0, False))
        on, off = [], []
        for i in range(args.pairs):
            order = (True, False) if i % 2 == 0 else (False, True)
            step += 1  # both steps of the pair: the same step number (sampling seed) and the same prompts
            data_state = trainer.batcher.state_dict()
            for standby in order:
                trainer.batcher.load_state_dict(data_state)
                rec = run_step(step, standby, True)
                steps.append(rec)
                (on if standby else off).append(rec["wall_s"])
    finally:
        trainer.close()
    ci = paired_ratio_ci(on, off)
    timed = [r for r in steps if r["timed"]]
    by_phase = {k: paired_ratio_ci([r[k] for r in timed if r["standby"]],
                                   [r[k] for r in timed if not r["standby"]]).to_dict()
                for k in ("gen_s", "train_s")}
    # the work standby itself adds: mapping the region before generation, releasing it after
    work = (statistics.median(wake_s) if wake_s else 0.0) + (statistics.median(sleep_s) if sleep_s else 0.0)
    result = {
        "benchmark": "standby_step",
        "model": args.model, "prompts_per_step": args.prompts_per_step, "generations": args.generations,
        "completion_len": args.completion_len, "pairs": args.pairs, "compile": args.compile,
        "micro_batch_size": args.micro_batch_size, "same_batch_pairs": True,
        "lora_rank": config.model.lora_rank, "lora_alpha": config.model.lora_alpha,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "compilepass": compilepass.__version__,
                     "python": sys.version.split()[0]},
        "kv_region_gib": (region.nbytes / 2**30) if region is not None else 0.0,
        "step_s_standby_on": summarize(on).to_dict(),
        "step_s_standby_off": summarize(off).to_dict(),
        "ratio_on_over_off": ci.to_dict(),
        "ratio_on_over_off_by_phase": by_phase,
        "standby_work_s": work,
        "standby_work_fraction_of_step": work / statistics.median(on + off),
        "wake_s_median": statistics.median(wake_s) if wake_s else None,
        "sleep_s_median": statistics.median(sleep_s) if sleep_s else None,
        "steps": steps,
        "command": "python " + " ".join(sys.argv),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("model", "device", "ratio_on_over_off", "standby_work_fraction_of_step",
                                             "step_s_standby_off", "wake_s_median", "sleep_s_median")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

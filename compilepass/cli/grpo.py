"""``compilepass grpo`` and ``compilepass bench context``: the GRPO runtime and its context benchmark.

The runtime is imported when a command runs: ``compilepass --help`` and the other commands stay
free of torch's import time."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from compilepass.core.atomic import write_json_atomic
from compilepass.core.errors import CompilepassError

TRL_FLAGS_HELP = ("TRL-style flags: any GRPOArguments field (compilepass.standby.grpo.trl_args), e.g. "
                  "--learning_rate 1e-5 --max_completion_length 512 --lr_scheduler_type cosine, in TRL's meaning, "
                  "set after --config, --preset and the section.key=value overrides")


def add_grpo(sub) -> None:
    p = sub.add_parser("grpo", help="GRPO fine-tuning with standby memory (the native engine)", epilog=TRL_FLAGS_HELP)
    p.add_argument("--config", default=None, help="a YAML or TOML run config (see compilepass.standby.grpo.config)")
    p.add_argument("--preset", default=None, help="a built-in config (tiny) to start from; --config merges on top")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. optim.lr=1e-4 run.max_steps=20")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: one plain line per logged step instead (the default when stderr "
                        "is not a terminal)")
    p.set_defaults(func=cmd_grpo, takes_trl_flags=True)


def _grpo_parser():
    """``compilepass grpo``'s own options plus one flag per GRPOArguments field, typed by
    transformers' HfArgumentParser; a flag not given stays unset (argparse.SUPPRESS)."""
    import argparse

    from transformers import HfArgumentParser

    from compilepass.core.errors import ConfigError
    from compilepass.standby.grpo.trl_args import GRPOArguments

    class Parser(HfArgumentParser):
        def error(self, message):  # one line through the CLI's error path, exit 2
            raise ConfigError(f"grpo: {message}")

    parser = Parser(GRPOArguments, prog="compilepass grpo")
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    parser.add_argument("--config", default=None)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("section_overrides", nargs="*")  # GRPOArguments has a field named overrides
    return parser


def _trl_flags(args):
    """Re-read ``grpo``'s arguments when they hold flags the first parse did not know:
    (the arguments, the GRPOArguments fields given)."""
    import dataclasses

    from compilepass.standby.grpo.trl_args import GRPOArguments

    argv = getattr(args, "argv", None) or []
    rest = argv[argv.index("grpo") + 1:] if "grpo" in argv else []
    ns, unknown = _grpo_parser().parse_known_intermixed_args(rest)
    if unknown:
        from compilepass.core.errors import ConfigError
        from compilepass.standby.grpo.trl_args import unsupported_names

        flags = [u for u in unknown if u.startswith("--")]
        if not flags:
            raise ConfigError(f"grpo: unrecognized arguments: {' '.join(unknown)}")
        raise ConfigError(unsupported_names(f[2:].split("=")[0].replace("-", "_") for f in flags))
    fields = {f.name for f in dataclasses.fields(GRPOArguments)}
    given = {k: v for k, v in vars(ns).items() if k in fields}
    args.config, args.preset, args.no_progress, args.overrides = ns.config, ns.preset, ns.no_progress, ns.section_overrides
    return given


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks of the standby runtime")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("context", help="the longest completion one GRPO step fits on this GPU (doubling, then bisection)")
    q.add_argument("--model", required=True, help="a preset name or a local Hugging Face directory")
    q.add_argument("--standby", choices=["on", "off"], default="on",
                   help="on: the KV region sleeps during training; off: it stays mapped")
    q.add_argument("--generations", type=int, default=2, help="completions per prompt (G)")
    q.add_argument("--lora-rank", type=int, default=32)
    q.add_argument("--min-len", type=int, default=256)
    q.add_argument("--max-len", type=int, default=65536)
    q.add_argument("--resolution", type=int, default=None, help="bisection stops at this many tokens (default min-len/4)")
    q.add_argument("--prompt-len", type=int, default=16)
    q.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    q.add_argument("--generate-tokens", type=int, default=None,
                   help="decode only this many tokens for real (KV region still sized for the full length), "
                        "fill the rest with random ids before training (default: generate all)")
    q.add_argument("--offload-activations", action="store_true",
                   help="offload checkpointed activations to pinned CPU memory during training")
    q.add_argument("--mlp-chunk-tokens", type=int, default=4096,
                   help="run each MLP over this many tokens at a time while training (0: off)")
    q.add_argument("--compile", choices=["auto", "eager", "default"], default=None,
                   help="the engine's decode step: tuned flags (auto; the CUDA default), eager (no compile; "
                        "the CPU default), or torch's default options")
    q.add_argument("--device-memory-gib", type=float, default=None,
                   help="run as on an N GiB card: the rest of the GPU is held for the run (e.g. 80 for an 80 GB card)")
    q.add_argument("--micro-batch-size", type=int, default=None,
                   help="completions per training forward/backward, gradients accumulated (default: the whole group)")
    q.add_argument("--load-in-4bit", action="store_true",
                   help="a QLoRA base: NF4 with double quantization (bitsandbytes), native engine")
    q.add_argument("--engine", choices=["native", "vllm"], default="native",
                   help="the rollout engine of every trial (vllm: the vllm extra, built per trial on the trainer's weights)")
    q.add_argument("--allow-cpu", action="store_true", help="run on the CPU (smoke tests; measures nothing about GPUs)")
    q.add_argument("--out", default=None, help="write the result as JSON here")
    q.set_defaults(func=cmd_bench_context)


def cmd_grpo(args) -> int:
    from compilepass.standby.grpo.config import default_config, load_config
    from compilepass.standby.grpo.trainer import (TrainingInterrupted,  # imports torch: only when the command runs
                                                  run_grpo)

    given = _trl_flags(args) if getattr(args, "extra", None) else {}
    if args.config is None and args.preset is None:
        raise CompilepassError("grpo needs --config FILE or --preset NAME (e.g. --preset tiny)")
    base = default_config(args.preset) if args.preset else None
    config = load_config(args.config, args.overrides, base=base)
    if given:  # TRL-style flags, in TRL's meaning, on top (standby/grpo/trl_convert.py)
        from compilepass.standby.grpo.trl_convert import apply_arguments

        config = apply_arguments(config, given)

    def interrupt(signum, frame):
        raise TrainingInterrupted(signum)

    # Until the loop handles it (GRPOTrainer.train), a SIGTERM ends the command as a Ctrl-C does.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt) if in_main else None
    try:
        summary = run_grpo(config, progress="lines" if args.no_progress else "auto")
    except TrainingInterrupted as e:
        where = (f"state as of step {e.step} saved in {e.checkpoint}" if e.checkpoint is not None
                 else f"the checkpoints in {config.run.output_dir} are as they were")
        print(f"compilepass: stopped by {e.signal_name}: {where}; the same command continues "
              f"(run.resume=auto)", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("compilepass: interrupted; the same command resumes from the last checkpoint in "
              f"{config.run.output_dir} (run.resume=auto)", file=sys.stderr, flush=True)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports the run
        return 0
    last = summary.metrics[-1] if summary.metrics else {}
    reward = f", reward {last['reward']:.4f}" if "reward" in last else ""
    print(f"grpo: steps {summary.start_step + 1}..{summary.final_step} done in {summary.wall_s:.1f}s{reward}; "
          f"metrics in {Path(config.run.output_dir) / 'metrics.jsonl'}, last checkpoint {summary.last_checkpoint}")
    return 0


def cmd_bench_context(args) -> int:
    from compilepass.standby.bench.context import max_context  # imports torch

    done = []

    def on_trial(t):
        what = (f"fits, peak {t.peak_mem_gib:.2f} GiB" if t.ok else f"does not fit ({t.error})")
        print(f"  completion_len {t.completion_len}: {what} [{t.step_s:.1f}s]", file=sys.stderr, flush=True)
        done.append(asdict(t))
        if args.out:  # a search cut short (timeout, kill) keeps every finished trial
            write_json_atomic(args.out, {"complete": False, "model": args.model, "standby": args.standby == "on",
                                         "command": " ".join(sys.argv), "trials": done})

    compile_options = {None: None, "auto": "auto", "eager": False, "default": {}}[args.compile]
    result = max_context(args.model, standby=args.standby == "on", generations=args.generations,
                         lora_rank=args.lora_rank, min_len=args.min_len, max_len=args.max_len,
                         resolution=args.resolution, prompt_len=args.prompt_len, dtype=args.dtype,
                         allow_cpu=args.allow_cpu, compile_options=compile_options,
                         generate_tokens=args.generate_tokens, offload_activations=args.offload_activations,
                         mlp_chunk_tokens=args.mlp_chunk_tokens, on_trial=on_trial,
                         device_memory_gib=args.device_memory_gib, engine=args.engine,
                         micro_batch_size=args.micro_batch_size, load_in_4bit=args.load_in_4bit)
    out = {"complete": True, **result.to_dict(), "command": " ".join(sys.argv)}
    if args.out:
        write_json_atomic(args.out, out)
    peak = f"{result.peak_mem_gib:.2f} GiB" if result.peak_mem_gib is not None else "-"
    print(f"max_completion_len {result.max_completion_len} (G={result.generations}, standby "
          f"{'on' if result.standby else 'off'}, {result.model} on {result.device}); peak memory {peak}")
    print(json.dumps({"max_completion_len": result.max_completion_len, "peak_mem_gib": result.peak_mem_gib}))
    return 0

"""``compilepass tune``: search Inductor options for a model and workload, verify, record."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from compilepass.core.atomic import sweep_stale_temp_files, write_json_atomic
from compilepass.core.errors import CompilepassError
from compilepass.core.paths import cache_dir
from compilepass.core.procs import interrupt_exit_code, interrupt_name, owner_tag, sigterm_raises_terminated
from compilepass.core.shapes import resolve_model_source
from compilepass.core.workload_spec import WorkloadSpec
from compilepass.db import NotRecordable, check_db_writable, record_tune_result, user_db_path
from compilepass.tuning.search import TuneConfig, Tuner, measured_trials


def add_tune(sub) -> None:
    p = sub.add_parser("tune", help="search Inductor options for a model and workload, verify the winner")
    p.add_argument("--model", required=True, help="a preset name (tiny, qwen3-0.6b, ...) or a local Hugging Face directory")
    p.add_argument("--workload", default="rollout", choices=["rollout", "train", "mlp"])
    p.add_argument("--engine", default="native", choices=["native", "vllm"],
                   help="rollout: measure the native decoder or vLLM's generation (engine start incl. torch.compile)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (rollout default 8 on CPU, 32 on CUDA)")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="train: tokens per sequence")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--load-in-4bit", action="store_true",
                   help="a QLoRA base (NF4, double quantization; bitsandbytes): its result is keyed as 4-bit and "
                        "never applies to a 16-bit model")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--trials", type=int, default=12, help="measured trials in the study, the defaults included")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for this run's search phase")
    p.add_argument("--storage", default=None, help="Optuna storage: an RDB URL or journal:PATH, a journal file "
                                                   "(default: SQLite in the user cache dir); several tuners may share it")
    p.add_argument("--study-name", default=None)
    p.add_argument("--policy", default="balanced", choices=["balanced", "throughput"],
                   help="balanced: best verified throughput with compile time <= --max-compile-ratio x defaults")
    p.add_argument("--max-compile-ratio", type=float, default=1.2)
    p.add_argument("--flags", nargs="+", default=None, help="search only these flags")
    p.add_argument("--exclude-flags", nargs="+", default=[], help="leave these flags out of the search")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per trial")
    p.add_argument("--verify-rounds", type=int, default=12)
    p.add_argument("--verify-candidates", type=int, default=3)
    p.add_argument("--trial-timeout", type=float, default=600.0, help="seconds before a trial is killed")
    p.add_argument("--no-verify", action="store_true", help="skip the side-by-side round (no winner is declared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the full result as JSON here")
    p.add_argument("--worker", action="store_true",
                   help="measure trials of a shared study (--storage) only; the tuner started without --worker "
                        "verifies and records once every worker's trials are done")
    p.add_argument("--no-record", action="store_true",
                   help="do not record the result in the user tuning database (<cache dir>/tuning_db.json)")
    p.set_defaults(func=cmd_tune)


def _given(value, default):
    """An option's value, or ``default`` when it was not given (None): 0 is a value, and invalid."""
    return default if value is None else value


def _is_cuda(args) -> bool:
    return args.device.startswith("cuda") or (args.device == "auto" and _cuda_available())


def _workload_from_args(args):
    cuda = _is_cuda(args)
    spec = WorkloadSpec(kind=args.workload, model=args.model, dtype=args.dtype, device=args.device,
                        lora_rank=args.lora_rank, seed=args.seed, engine=args.engine,
                        load_in_4bit=args.load_in_4bit,
                        batch=_given(args.batch, 32 if cuda else 8),
                        prompt_len=_given(args.prompt_len, 128 if cuda else 16),
                        new_tokens=_given(args.new_tokens, 256 if cuda else 16),
                        seq_len=_given(args.seq_len, 1024 if cuda else 64))
    spec.validate()  # sizes first: one line, before the model is resolved or anything is opened
    if spec.load_in_4bit:
        from compilepass.core.quantize import require_bitsandbytes

        require_bitsandbytes()  # one line here, not one failed trial after another
    if args.workload != "mlp":
        resolve_model_source(args.model)  # fail here, in one line, before any study is created
    return spec


def _config_from_args(args) -> TuneConfig:
    workload = _workload_from_args(args)
    config = TuneConfig(
        workload=workload, trials=args.trials, time_budget_s=args.time_budget, storage=args.storage,
        study_name=args.study_name, policy=args.policy, max_compile_ratio=args.max_compile_ratio,
        verify_candidates=args.verify_candidates, verify_rounds=args.verify_rounds,
        repeats=_given(args.repeats, 10 if workload.resolved_device().startswith("cuda") else 5),
        trial_timeout_s=args.trial_timeout, include_flags=args.flags, exclude_flags=args.exclude_flags,
        seed=args.seed, verify=not args.no_verify, worker=args.worker,
    )
    config.validate()
    return config


def _check_outputs(args) -> None:
    """Before the first trial: the user database parses and can be written (when the result will be
    recorded), and ``--out`` can be written."""
    if not args.no_record and not args.no_verify and not args.worker and args.workload != "mlp":  # mlp: never recorded
        check_db_writable(user_db_path())
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=f".{out.name}.{owner_tag()}.", suffix=".tmp", dir=out.parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise CompilepassError(f"cannot write --out {out}: {exc.strerror}") from None
        for path in sweep_stale_temp_files(out.parent):
            logging.getLogger("compilepass.cli").info("removed %s (left by a writer that no longer runs)", path)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_tune(args) -> int:
    """Ctrl-C (exit 130) or SIGTERM (exit 143) at any point ends with one line: the running trial
    or verification is killed with its whole process group, the study keeps every finished trial."""
    with sigterm_raises_terminated():
        stage = {"now": "setup"}
        try:
            return _tune(args, stage)
        except KeyboardInterrupt as exc:
            print(f"compilepass: {interrupt_name(exc)}: {_stopped_line(stage)}", file=sys.stderr)
            return interrupt_exit_code(exc)


def _stopped_line(stage: dict) -> str:
    if stage["now"] == "setup":
        return "stopped before the first trial; nothing was measured or recorded"
    where = {"search": "the running trial was abandoned", "verify": "verification was abandoned",
             "wait": "stopped while waiting for other tuners' trials",
             "record": "stopped while recording; the database holds the old or the new entry"}[stage["now"]]
    study = stage["study"]
    return (f"{where}; study {study.study_name} keeps its {len(measured_trials(study))} finished trials, "
            f"run the same command to resume")


def _tune(args, stage: dict) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    config = _config_from_args(args)  # bad numbers: one line, nothing opened or recorded
    _check_outputs(args)
    tuner = Tuner(config)  # sweeps leftovers, opens the study: every user error before the first trial
    stage.update(now="search", study=tuner.study)
    result = _run_with_progress(tuner, config, console, stage)
    stage["now"] = "record"
    print_tune_table(result)
    if args.out:
        write_json_atomic(args.out, result.to_dict())
        console.print(f"result written to {args.out}")
    if not args.no_record:
        _record(result, args, console)
    return 0


def _run_with_progress(tuner, config, console, stage: dict):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # Where stderr is no terminal, a progress display would print its last frame when interrupted.
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TextColumn("{task.fields[last]}"), console=console,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("trials", total=config.trials, last="")

        def on_phase(name, obj):
            stage["now"] = name
            if name == "search":
                done = len(measured_trials(obj))
                progress.update(task, completed=min(done, config.trials),
                                last=f"study {obj.study_name} ({done} measured already)" if done else "")
            elif name == "wait":
                progress.update(task, description="waiting", last=f"for trials {obj} of other tuners")
            elif name == "verify":
                progress.update(task, description="verifying", last=f"{len(obj)} candidates vs defaults, interleaved")

        def on_trial(number, flags, result):
            if result is None:
                progress.update(task, last=f"#{number} duplicate, not measured")
                return
            progress.advance(task)
            what = (f"{result.throughput:,.0f} tok/s, compile {result.compile_s:.1f}s" if result.ok
                    else result.status)
            progress.update(task, last=f"#{number} {what}")

        return tuner.run(on_trial=on_trial, on_phase=on_phase)


def _record(result, args, console) -> None:
    """Record into the user database; a result that must not be recorded is said so, not an error."""
    if args.no_verify:
        console.print("not recorded in the tuning database: --no-verify declares no winner")
        return
    if getattr(args, "worker", False):
        console.print("not recorded in the tuning database: a --worker only measures")
        return
    try:
        entry = record_tune_result(result, policy=args.policy, engine=getattr(args, "engine", "native"))
    except NotRecordable as exc:
        console.print(str(exc))
        return
    except CompilepassError as exc:
        saved = cache_dir() / f"tune-result-{result.study_name}.json"
        write_json_atomic(saved, result.to_dict())
        raise CompilepassError(f"{exc}; the result is saved in {saved} (add it later with "
                               f"`compilepass db import-result {saved}`)") from None
    console.print(f"recorded as entry {entry['id']} ({entry['verdict']}) in {user_db_path()}")


def print_tune_table(result) -> None:
    """Trial ratios are marked ``~`` (unverified: trials ran one after another, each in its own
    process); verified ratios and compile ratios come from the side-by-side process."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    defaults = result.defaults
    verified = {json.dumps(c["flags"], sort_keys=True): c for c in result.candidates}
    table = Table(title=f"compilepass tune: {result.study_name}")
    # vLLM's trials pass the flags on top of vLLM's own Inductor config (combo_kernels on for torch >= 2.9)
    baseline = "vLLM's defaults" if (result.workload or {}).get("engine") == "vllm" else "torch defaults"
    for col in ("#", f"flags (vs {baseline})", "status", "compile s", "tok/s", "trial ratio (~ unverified)",
                "verified ratio (95% CI)", "compile ratio (verified)"):
        table.add_column(col, overflow="fold")
    for row in result.trials:
        if not row["measured"]:
            continue
        flags = ", ".join(f"{k}={v}" for k, v in row["flags"].items()) or f"({baseline})"
        ratio = ""
        if defaults and row["throughput"]:
            ratio = f"~{row['throughput'] / defaults['throughput']:.3f}"
        cand = verified.get(json.dumps(row["flags"], sort_keys=True), {})
        ver = cand.get("verified_ratio")
        vtxt = f"{ver['ratio']:.3f} ({ver['low']:.3f}-{ver['high']:.3f})" if ver else ""
        ctxt = f"{cand['compile_ratio_in_process']:.2f}" if cand.get("compile_ratio_in_process") is not None else ""
        table.add_row(str(row["number"]), flags, row["status"],
                      f"{row['compile_s']:.1f}" if row["compile_s"] else "",
                      f"{row['throughput']:,.0f}" if row["throughput"] else "", ratio, vtxt, ctxt)
    console.print(table)
    console.print("~ unverified: each trial ran in its own process, one after another; only the verified "
                  "columns come from the side-by-side run")
    console.print(f"[bold]{result.decision}[/bold]")
    if result.winner:
        console.print("flags: " + json.dumps(result.winner, sort_keys=True))

"""``compilepass`` command line: a thin layer over the Python API.

User errors end with one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .errors import CompilepassError


def _add_tune(sub) -> None:
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
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--trials", type=int, default=12, help="measured trials in the study, the defaults included")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for this run's search phase")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in the user cache dir)")
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
    p.add_argument("--no-record", action="store_true",
                   help="do not record the result in the user tuning database (<cache dir>/tuning_db.json)")
    p.set_defaults(func=cmd_tune)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="the environment key and which Inductor options exist here")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--model", default=None, help="a preset or local HF directory: show which tuning-database "
                                                  "entry would apply and why")
    p.add_argument("--workload", default="rollout", choices=["rollout", "train", "mlp"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--engine", default="native", choices=["native", "vllm"])
    p.add_argument("--policy", default="balanced", choices=["balanced", "throughput"])
    p.set_defaults(func=cmd_info)


def _add_db(sub) -> None:
    p = sub.add_parser("db", help="the tuning database: list, show, verify, merge, export, import-result, remove")
    dsub = p.add_subparsers(dest="db_command", required=True)
    q = dsub.add_parser("list", help="entries of the merged view (shipped + user), or of --file")
    q.add_argument("--file", default=None, help="list this database file only")
    q.set_defaults(func=cmd_db_list)
    q = dsub.add_parser("show", help="one entry as JSON (an id or a unique id prefix)")
    q.add_argument("id")
    q.add_argument("--file", default=None)
    q.set_defaults(func=cmd_db_show)
    q = dsub.add_parser("verify", help="check schema, flags against the running torch, and known-bad gates")
    q.add_argument("file", nargs="?", default=None, help="default: the shipped and the user database")
    q.set_defaults(func=cmd_db_verify)
    q = dsub.add_parser("merge", help="merge databases; same key: the entry with the later date is kept")
    q.add_argument("sources", nargs="+")
    q.add_argument("--into", required=True, help="the database to merge into (created if missing)")
    q.set_defaults(func=cmd_db_merge)
    q = dsub.add_parser("export", help="write the merged view (shipped + user) to a file")
    q.add_argument("out")
    q.set_defaults(func=cmd_db_export)
    q = dsub.add_parser("import-result", help="add a `compilepass tune --out` result JSON as an entry")
    q.add_argument("result")
    q.add_argument("--into", default=None, help="database file (default: the user database)")
    q.add_argument("--policy", default=None, choices=["balanced", "throughput"],
                   help="default: the --policy of the recorded command, else balanced")
    q.add_argument("--engine", default="native", choices=["native", "vllm"])
    q.set_defaults(func=cmd_db_import)
    q = dsub.add_parser("remove", help="delete one entry (an id or a unique id prefix) from a database file")
    q.add_argument("id")
    q.add_argument("--file", default=None, help="database file (default: the user database)")
    q.set_defaults(func=cmd_db_remove)


def _add_grpo(sub) -> None:
    p = sub.add_parser("grpo", help="GRPO fine-tuning with standby memory (the native engine)")
    p.add_argument("--config", default=None, help="a YAML or TOML run config (see compilepass.standby.grpo_config)")
    p.add_argument("--preset", default=None, help="a built-in config (tiny) to start from; --config merges on top")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. optim.lr=1e-4 run.max_steps=20")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_grpo)


def _add_bench(sub) -> None:
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
    q.add_argument("--allow-cpu", action="store_true", help="run on the CPU (smoke tests; measures nothing about GPUs)")
    q.add_argument("--out", default=None, help="write the result as JSON here")
    q.set_defaults(func=cmd_bench_context)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compilepass", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tune(sub)
    _add_info(sub)
    _add_db(sub)
    _add_grpo(sub)
    _add_bench(sub)
    return parser


def _workload_from_args(args):
    from .workloads import WorkloadSpec

    cuda = args.device.startswith("cuda") or (args.device == "auto" and _cuda_available())
    spec = WorkloadSpec(kind=args.workload, model=args.model, dtype=args.dtype, device=args.device,
                        lora_rank=args.lora_rank, seed=args.seed, engine=args.engine)
    spec.batch = args.batch or (32 if cuda else 8)
    spec.prompt_len = args.prompt_len or (128 if cuda else 16)
    spec.new_tokens = args.new_tokens or (256 if cuda else 16)
    spec.seq_len = args.seq_len or (1024 if cuda else 64)
    if args.workload != "mlp":
        from compilepass.standby.models import resolve_model_source

        resolve_model_source(args.model)  # fail here, in one line, before any study is created
    return spec


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_tune(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .atomic import write_json_atomic
    from .search import Tuner, TuneConfig

    console = Console(stderr=True)
    workload = _workload_from_args(args)
    config = TuneConfig(
        workload=workload, trials=args.trials, time_budget_s=args.time_budget, storage=args.storage,
        study_name=args.study_name, policy=args.policy, max_compile_ratio=args.max_compile_ratio,
        verify_candidates=args.verify_candidates, verify_rounds=args.verify_rounds,
        repeats=args.repeats or (10 if workload.resolved_device().startswith("cuda") else 5),
        trial_timeout_s=args.trial_timeout, include_flags=args.flags, exclude_flags=args.exclude_flags,
        seed=args.seed, verify=not args.no_verify,
    )
    tuner = Tuner(config)  # every user error surfaces here, before the progress bar
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TextColumn("{task.fields[last]}"), console=console) as progress:
        task = progress.add_task("trials", total=config.trials, last="")

        def on_phase(phase, obj):
            if phase == "search":
                from .search import measured_trials

                done = len(measured_trials(obj))
                progress.update(task, completed=min(done, config.trials),
                                last=f"study {obj.study_name} ({done} measured already)" if done else "")
            elif phase == "verify":
                progress.update(task, description="verifying", last=f"{len(obj)} candidates vs defaults, interleaved")

        def on_trial(number, flags, result):
            if result is None:
                progress.update(task, last=f"#{number} duplicate, not measured")
                return
            progress.advance(task)
            what = (f"{result.throughput:,.0f} tok/s, compile {result.compile_s:.1f}s" if result.ok
                    else result.status)
            progress.update(task, last=f"#{number} {what}")

        result = tuner.run(on_trial=on_trial, on_phase=on_phase)
    print_tune_table(result)
    if args.out:
        write_json_atomic(args.out, result.to_dict())
        console.print(f"result written to {args.out}")
    if not args.no_record:
        _record(result, args, console)
    return 0


def _record(result, args, console) -> None:
    """Record into the user database; a result that must not be recorded is said so, not an error."""
    from .atomic import write_json_atomic
    from .db import NotRecordable, record_tune_result, user_db_path
    from .search import cache_dir

    if args.no_verify:
        console.print("not recorded in the tuning database: --no-verify declares no winner")
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
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    defaults = result.defaults
    verified = {json.dumps(c["flags"], sort_keys=True): c for c in result.candidates}
    table = Table(title=f"compilepass tune: {result.study_name}")
    for col in ("#", "flags (vs torch defaults)", "status", "compile s", "tok/s", "trial ratio", "verified ratio (95% CI)"):
        table.add_column(col, overflow="fold")
    for row in result.trials:
        if not row["measured"]:
            continue
        flags = ", ".join(f"{k}={v}" for k, v in row["flags"].items()) or "(torch defaults)"
        ratio = ""
        if defaults and row["throughput"]:
            ratio = f"{row['throughput'] / defaults['throughput']:.3f}"
        ver = verified.get(json.dumps(row["flags"], sort_keys=True), {}).get("verified_ratio")
        vtxt = f"{ver['ratio']:.3f} ({ver['low']:.3f}-{ver['high']:.3f})" if ver else ""
        table.add_row(str(row["number"]), flags, row["status"],
                      f"{row['compile_s']:.1f}" if row["compile_s"] else "",
                      f"{row['throughput']:,.0f}" if row["throughput"] else "", ratio, vtxt)
    console.print(table)
    console.print(f"[bold]{result.decision}[/bold]")
    if result.winner:
        console.print("flags: " + json.dumps(result.winner, sort_keys=True))


def cmd_info(args) -> int:
    from .env import current_environment
    from .flags import FlagSpace

    env = current_environment()
    space = FlagSpace(env=env)
    rows = space.describe()
    selection = None
    if args.model:
        from .select import select

        selection = select(args.model, args.workload, batch=args.batch, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens, engine=args.engine, policy=args.policy, env=env,
                           log_line=False)
    if args.json:
        out = {"environment": env.to_dict(), "device_kind": env.device_kind, "flags": rows}
        if selection is not None:
            out["selection"] = {"model": args.model, "workload": args.workload, "flags": selection.flags,
                                "match_level": selection.match_level, "level_name": selection.level_name,
                                "reason": selection.reason, "entry_id": selection.entry_id,
                                "source": selection.source, "dropped": selection.dropped}
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for k, v in env.to_dict().items():
        console.print(f"{k:>20}: {v}")
    table = Table(title=f"Inductor options searched on {env.device_kind}")
    for col in ("flag", "choices", "torch default", "searched", "why not"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], ", ".join(map(str, r["choices"])), str(r["torch_default"]),
                      "yes" if r["available"] else "no", r["why_not"])
    console.print(table)
    if selection is not None:
        console.print(f"[bold]tuning database for {args.model} ({args.workload}, {args.engine}, {args.policy}):[/bold]")
        level = f"{selection.match_level} ({selection.level_name})" if selection.match_level else "off"
        console.print(f"  match level: {level}")
        console.print(f"  entry: {selection.entry_id or '-'}  source: {selection.source or '-'}")
        console.print(f"  reason: {selection.reason}")
        console.print("  flags: " + (json.dumps(selection.flags, sort_keys=True) if selection.flags
                                     else "{} (torch defaults)"))
        for name, why in selection.dropped.items():
            console.print(f"  dropped {name}: {why}")
    return 0


# -- compilepass db ---------------------------------------------------------------------------------


def _rows(file: Optional[str]):
    from .db import load_db, merged_view

    if file:
        return [(e, file) for e in load_db(file, missing_ok=False)["entries"]]
    return merged_view()


def _flags_text(flags: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in flags.items()) or "(keep defaults)"


def cmd_db_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    rows = _rows(args.file)
    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=f"compilepass tuning database ({len(rows)} entries)")
    for col in ("id", "source", "device", "torch", "model", "workload/bucket", "policy", "flags", "ratio (95% CI)"):
        table.add_column(col, overflow="fold")
    for e, src in sorted(rows, key=lambda r: r[0]["id"]):
        k, m = e["key"], e["measurements"]
        ratio = (f"{m['ratio']:.3f} ({m['ratio_ci_low']:.3f}-{m['ratio_ci_high']:.3f})" if m.get("ratio")
                 else "1 (defaults)")
        model = f"{e.get('model_name') or k['model']['family']} {k['model']['dtype']}"
        table.add_row(e["id"], src.split(" (")[0], k["device_name"], k["torch"], model,
                      f"{k['workload']}/{k['bucket']}", e.get("policy", k.get("policy", "")), _flags_text(e["flags"]),
                      ratio)
    console.print(table)
    return 0


def cmd_db_show(args) -> int:
    from .db import find_entry

    entry, src = find_entry(_rows(args.file), args.id)
    print(json.dumps(entry, indent=2))
    return 0


def verify_entries(doc_rows, env=None) -> list[str]:
    """Problems of (entry, source) rows: flags unknown to the running torch or of the wrong type, and
    known-bad gates for the environment the entry was measured in."""
    from .db import TuneKey
    from .env import EnvironmentKey, current_environment
    from .errors import UnknownFlagError
    from .flags import FlagSpace, inductor_options

    env = env or current_environment()
    options = inductor_options()
    problems = []
    for e, src in doc_rows:
        where = f"entry {e.get('id')} ({src})"
        try:
            key = TuneKey.from_dict(e["key"])
        except (KeyError, TypeError) as exc:
            problems.append(f"{where}: bad key ({exc})")
            continue
        if key.entry_id() != e.get("id"):
            problems.append(f"{where}: id does not match its key (expected {key.entry_id()})")
        measured_env = EnvironmentKey(torch=key.torch, triton=key.triton, vllm=key.vllm, transformers=None,
                                      cuda=key.cuda, device_name=key.device_name,
                                      compute_capability=key.compute_capability, python="")
        space = FlagSpace(env=measured_env, engine=key.engine, inductor_config=options)
        for name, value in e["flags"].items():
            try:
                space.validate({name: value})
            except UnknownFlagError as exc:
                problems.append(f"{where}: {str(exc).split(';')[0]} in the running torch {env.torch}")
        for gate in space.violations(e["flags"]):
            problems.append(f"{where}: {', '.join(f'{k}={v}' for k, v in gate.when.items())} is gated unsafe for "
                            f"torch {key.torch} on {measured_env.device_kind} ({key.engine}): {gate.reason}")
    return problems


def cmd_db_verify(args) -> int:
    from .db import load_db, merged_view

    if args.file:
        rows = [(e, args.file) for e in load_db(args.file, missing_ok=False)["entries"]]
    else:
        rows = merged_view()
    problems = verify_entries(rows)
    for p in problems:
        print(p)
    if problems:
        print(f"compilepass: error: {len(problems)} problem(s) in {len(rows)} entries", file=sys.stderr)
        return 1
    print(f"ok: {len(rows)} entries, schema and flags valid for torch {__import__('torch').__version__}")
    return 0


def cmd_db_merge(args) -> int:
    from .db import add_entries, load_db

    incoming = []
    for src in args.sources:
        incoming.extend(load_db(src, missing_ok=False)["entries"])
    conflicts = add_entries(args.into, incoming)
    for c in conflicts:
        print(f"conflict on {c['id']}: kept the {c['kept']} entry dated {c['kept_date']}, dropped the one dated "
              f"{c['dropped_date']}")
    print(f"merged {len(incoming)} entries from {len(args.sources)} file(s) into {args.into} "
          f"({len(conflicts)} conflict(s); rule: same key -> later date wins)")
    return 0


def cmd_db_export(args) -> int:
    from .atomic import write_json_atomic
    from .db import SCHEMA_VERSION, now_iso

    rows = _rows(None)
    doc = {"schema_version": SCHEMA_VERSION, "db_version": now_iso(),
           "entries": sorted((e for e, _ in rows), key=lambda e: e["id"])}
    write_json_atomic(args.out, doc)
    print(f"exported {len(rows)} entries (shipped + user) to {args.out}")
    return 0


def cmd_db_import(args) -> int:
    from .db import add_entries, entry_from_tune_result, user_db_path

    try:
        result = json.loads(Path(args.result).read_text())
    except FileNotFoundError:
        raise CompilepassError(f"result file {args.result} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as exc:
        raise CompilepassError(f"result file {args.result} is not JSON ({exc})") from None
    note = f"imported from {args.result} by `compilepass db import-result`"
    entry = entry_from_tune_result(result, policy=args.policy, engine=args.engine, note=note)
    into = args.into or user_db_path()
    conflicts = add_entries(into, [entry])
    extra = f" (replaced an entry with the same key: {conflicts[0]['kept']} kept)" if conflicts else ""
    print(f"entry {entry['id']} ({entry['verdict']}, {entry['policy']}) written to {into}{extra}")
    return 0


def cmd_db_remove(args) -> int:
    from .db import remove_entry, user_db_path

    path = args.file or user_db_path()
    entry = remove_entry(path, args.id)
    print(f"entry {entry['id']} ({entry['verdict']}, {entry['policy']}) removed from {path}")
    return 0


# -- compilepass grpo / bench -----------------------------------------------------------------------


def cmd_grpo(args) -> int:
    from compilepass.standby.grpo import run_grpo
    from compilepass.standby.grpo_config import default_config, load_config

    if args.config is None and args.preset is None:
        raise CompilepassError("grpo needs --config FILE or --preset NAME (e.g. --preset tiny)")
    base = default_config(args.preset) if args.preset else None
    config = load_config(args.config, args.overrides, base=base)
    try:
        summary = run_grpo(config, progress=False if args.no_progress else "auto")
    except KeyboardInterrupt:
        print("compilepass: interrupted; the same command resumes from the last checkpoint in "
              f"{config.run.output_dir} (run.resume=auto)", file=sys.stderr)
        return 130
    last = summary.metrics[-1] if summary.metrics else {}
    reward = f", reward {last['reward']:.4f}" if "reward" in last else ""
    print(f"grpo: steps {summary.start_step + 1}..{summary.final_step} done in {summary.wall_s:.1f}s{reward}; "
          f"metrics in {Path(config.run.output_dir) / 'metrics.jsonl'}, last checkpoint {summary.last_checkpoint}")
    return 0


def cmd_bench_context(args) -> int:
    from .atomic import write_json_atomic
    from compilepass.standby.bench_context import max_context

    done = []

    def on_trial(t):
        what = (f"fits, peak {t.peak_mem_gib:.2f} GiB" if t.ok else f"does not fit ({t.error})")
        print(f"  completion_len {t.completion_len}: {what} [{t.step_s:.1f}s]", file=sys.stderr, flush=True)
        done.append(asdict(t))
        if args.out:  # a search cut short (timeout, kill) keeps every finished trial
            write_json_atomic(args.out, {"complete": False, "model": args.model, "standby": args.standby == "on",
                                         "command": " ".join(sys.argv), "trials": done})

    if args.generate_tokens is not None and args.generate_tokens < 1:
        raise CompilepassError(f"--generate-tokens must be >= 1 (got {args.generate_tokens})")
    if args.mlp_chunk_tokens < 0:
        raise CompilepassError(f"--mlp-chunk-tokens must be >= 0 (got {args.mlp_chunk_tokens})")
    compile_options = {None: None, "auto": "auto", "eager": False, "default": {}}[args.compile]
    result = max_context(args.model, standby=args.standby == "on", generations=args.generations,
                         lora_rank=args.lora_rank, min_len=args.min_len, max_len=args.max_len,
                         resolution=args.resolution, prompt_len=args.prompt_len, dtype=args.dtype,
                         allow_cpu=args.allow_cpu, compile_options=compile_options,
                         generate_tokens=args.generate_tokens, offload_activations=args.offload_activations,
                         mlp_chunk_tokens=args.mlp_chunk_tokens, on_trial=on_trial)
    out = {"complete": True, **result.to_dict(), "command": " ".join(sys.argv)}
    if args.out:
        write_json_atomic(args.out, out)
    peak = f"{result.peak_mem_gib:.2f} GiB" if result.peak_mem_gib is not None else "-"
    print(f"max_completion_len {result.max_completion_len} (G={result.generations}, standby "
          f"{'on' if result.standby else 'off'}, {result.model} on {result.device}); peak memory {peak}")
    print(json.dumps({"max_completion_len": result.max_completion_len, "peak_mem_gib": result.peak_mem_gib}))
    return 0


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except CompilepassError as exc:
        print(f"compilepass: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("compilepass: interrupted; completed trials are kept in the study and resume on the next run",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

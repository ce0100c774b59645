"""``compilepass db ...``: list, show, verify, merge, export, import-result and remove database entries."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from compilepass.core.atomic import write_json_atomic
from compilepass.core.env import EnvironmentKey, current_environment
from compilepass.core.errors import CompilepassError, UnknownFlagError
from compilepass.db import (SCHEMA_VERSION, TuneKey, add_entries, entry_from_tune_result, find_entry, load_db,
                            merged_view, now_iso, remove_entry, user_db_path)
from compilepass.flags import FlagSpace, inductor_options


def add_db(sub) -> None:
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
    q.add_argument("--engine", default=None, choices=["native", "vllm"],
                   help="default: the engine the result was measured on (it must match)")
    q.set_defaults(func=cmd_db_import)
    q = dsub.add_parser("remove", help="delete one entry (an id or a unique id prefix) from a database file")
    q.add_argument("id")
    q.add_argument("--file", default=None, help="database file (default: the user database)")
    q.set_defaults(func=cmd_db_remove)


def _rows(file: Optional[str]):
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
    entry, src = find_entry(_rows(args.file), args.id)
    print(json.dumps(entry, indent=2))
    return 0


def verify_entries(doc_rows, env=None) -> list[str]:
    """Problems of (entry, source) rows: flags unknown to the running torch or of the wrong type, and
    known-bad gates for the environment the entry was measured in."""

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
    rows = _rows(None)
    doc = {"schema_version": SCHEMA_VERSION, "db_version": now_iso(),
           "entries": sorted((e for e, _ in rows), key=lambda e: e["id"])}
    write_json_atomic(args.out, doc)
    print(f"exported {len(rows)} entries (shipped + user) to {args.out}")
    return 0


def cmd_db_import(args) -> int:
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
    path = args.file or user_db_path()
    entry = remove_entry(path, args.id)
    print(f"entry {entry['id']} ({entry['verdict']}, {entry['policy']}) removed from {path}")
    return 0

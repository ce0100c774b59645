"""``compilepass info``: the environment key, the flag space here, and what the database would apply."""

from __future__ import annotations

import json

from compilepass.core.env import current_environment
from compilepass.core.errors import ConfigError
from compilepass.flags import FlagSpace
from compilepass.selection import select


def add_info(sub) -> None:
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


def cmd_info(args) -> int:
    for option in ("batch", "prompt_len", "new_tokens"):
        value = getattr(args, option)
        if value is not None and value < 1:  # not given is None: matched to the nearest measured bucket
            raise ConfigError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    env = current_environment()
    space = FlagSpace(env=env)
    rows = space.describe()
    selection = None
    if args.model:
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

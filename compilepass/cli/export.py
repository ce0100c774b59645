"""``compilepass export-merged``: a run's final adapter merged into its base, as a plain
transformers model directory (:func:`compilepass.standby.grpo.outputs.export_merged`)."""

from __future__ import annotations


def add_export(sub) -> None:
    p = sub.add_parser("export-merged", help="merge a run's final LoRA adapter into its base model (plain HF directory)")
    p.add_argument("adapter_dir", help="a run's output_dir (its final adapter) or any peft adapter directory")
    p.add_argument("--out", default=None, help="where to write the merged model (default ADAPTER_DIR/merged)")
    p.add_argument("--base", default=None,
                   help="the base model: a preset, a local directory or a cached Hub id (default: the run's own, "
                        "else the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of a base loaded by name (default: the run's, else float32)")
    p.set_defaults(func=cmd_export_merged)


def cmd_export_merged(args) -> int:
    from compilepass.standby.grpo.outputs import export_merged

    out = export_merged(args.adapter_dir, args.out, base=args.base, dtype=args.dtype)
    print(out)
    return 0

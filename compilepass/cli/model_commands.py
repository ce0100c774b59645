"""``compilepass model import-gguf``: a GGUF checkpoint as a plain Hugging Face directory."""

from __future__ import annotations

from compilepass.core.gguf_import import SMOLLM2_DIST, import_gguf, packaged_gguf


def add_model(sub) -> None:
    p = sub.add_parser("model", help="model files: import a GGUF checkpoint as a Hugging Face directory")
    msub = p.add_subparsers(dest="model_command", required=True)
    q = msub.add_parser("import-gguf", help="dequantize a .gguf file into config.json + model.safetensors + tokenizer")
    q.add_argument("gguf", help=f"a .gguf file, or 'package:DIST' for the one an installed distribution ships "
                                f"(package:{SMOLLM2_DIST} is SmolLM2-135M-Instruct)")
    q.add_argument("out_dir", help="a new (or empty) directory")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    q.set_defaults(func=cmd_import_gguf)


def cmd_import_gguf(args) -> int:
    source = packaged_gguf(args.gguf.split(":", 1)[1]) if args.gguf.startswith("package:") else args.gguf
    out = import_gguf(source, args.out_dir, dtype=args.dtype)
    print(f"wrote {out} (from {source})")
    return 0

"""``compilepass`` command line: a thin layer over the Python API.

User errors end with one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from compilepass.cli.db_commands import add_db
from compilepass.cli.export import add_export
from compilepass.cli.grpo import add_bench, add_grpo
from compilepass.cli.info import add_info
from compilepass.cli.model_commands import add_model
from compilepass.cli.tune import add_tune
from compilepass.core.errors import CompilepassError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compilepass", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_tune(sub)
    add_info(sub)
    add_db(sub)
    add_grpo(sub)
    add_bench(sub)
    add_model(sub)
    add_export(sub)
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_trl_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv, args.extra = argv, extra  # `grpo` reads TRL-style flags (--learning_rate 1e-5) from them
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

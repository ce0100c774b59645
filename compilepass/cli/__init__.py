"""The ``compilepass`` command: thin subcommands over the Python API.

:mod:`~compilepass.cli.app` builds the parser and runs a command; one module per command family
(:mod:`~compilepass.cli.tune`, :mod:`~compilepass.cli.info`, :mod:`~compilepass.cli.db_commands`,
:mod:`~compilepass.cli.grpo`).
"""

from compilepass.cli.app import build_parser, main

__all__ = ["build_parser", "main"]

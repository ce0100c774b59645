"""User-facing errors: the CLI turns each into one line on stderr and a non-zero exit."""

from __future__ import annotations


class CompilepassError(Exception):
    """An error caused by input or environment, reported without a traceback."""

    exit_code = 2


class UnknownFlagError(CompilepassError):
    pass


class ModelNotFoundError(CompilepassError):
    pass


class StorageError(CompilepassError):
    pass


class ConfigError(CompilepassError):
    pass

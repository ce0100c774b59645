"""Checks of count and size arguments, one ConfigError line each naming the option, shared by the
Python API and the CLI (a value the CLI rejects is rejected from Python the same way)."""

from __future__ import annotations

import math

from compilepass.core.errors import ConfigError


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int, why: str = "") -> None:
    """``value`` an integer >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}{why}, got {value}")


def check_positive(name: str, value, unit: str = "") -> None:
    """``value`` a finite number > 0."""
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0{unit}, got {value!r}")

"""Checking a config value against its dataclass annotation (int, float, bool, str, Literal, Optional,
list, dict), with one-line errors that name the key and what it must be."""

from __future__ import annotations

import math
import typing
from typing import Any, Literal, Union

from compilepass.core.errors import ConfigError


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        return "a mapping of names to values"
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, type_name(item))
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp, key: str, source: str):
    """Check ``value`` against the annotation ``tp``; convert int -> float and "1e-3" -> float."""
    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{prefix(source)}'{key}' must be {type_name(tp)} (got {value!r}){extra}")

    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key, source)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            raise ConfigError(f"{prefix(source)}'{key}' must be one of {', '.join(map(str, choices))} (got {value!r})")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad()
        return [coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad()
        key_tp, value_tp = typing.get_args(tp)
        return {k: v if value_tp is Any else coerce(v, value_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            value = float(value)
        elif isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if math.isnan(value):
            raise bad()
        if math.isinf(value):
            raise ConfigError(f"{prefix(source)}'{key}' must be a finite number (got {value!r})")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. run.resume or model.name_or_path given as a bare number
        if not isinstance(value, str):
            raise bad()
        return value
    raise bad()  # pragma: no cover - every annotation above is handled


def prefix(source: str | None) -> str:
    return f"{source}: " if source and source != "config" else ""

"""Checking a config value against its dataclass annotation with pydantic v2, and the one-line
message that names the key when it does not fit.

Pydantic (``TypeAdapter``, one per annotation, cached) does the parsing. Three choices are ours:
integers and booleans are strict (``"8"``, ``2.5`` and ``True`` are not integers; ``1`` and ``"yes"``
are not booleans); a number key takes an integer or a numeric string (YAML 1.1 reads ``1e-4`` as a
string) but not a boolean, and must be finite; a string key takes a bare number as its text
(``run.resume=5``). Lists take tuples. Errors become ``'key' must be <what> (got <value>)``, the
item named (``'model.lora_targets[1]'``) where one item of a list or mapping is wrong.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Annotated, Any, Literal, Union

from compilepass.core.errors import ConfigError

__all__ = ["coerce", "type_name", "prefix"]


def type_name(tp) -> str:
    """What a value of annotation ``tp`` must be, in words (``a list of strings``)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union or origin is types.UnionType:
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        return "a mapping of names to values"
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, type_name(item))
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp, key: str, source: str):
    """``value`` checked against the annotation ``tp`` and converted (int -> float, "1e-3" -> float,
    tuple -> list, a number -> str); ConfigError naming ``key`` (and ``source``, a file) otherwise."""
    import pydantic

    try:
        return _adapter(tp).validate_python(value)
    except pydantic.ValidationError as e:
        raise ConfigError(_message(e.errors()[0], value, tp, key, source)) from None


def prefix(source: str | None) -> str:
    return f"{source}: " if source and source != "config" else ""


# ------------------------------------------------------------------------------------------------


def _not_bool(value):
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


@functools.lru_cache(maxsize=None)
def _adapter(tp):
    import pydantic

    return pydantic.TypeAdapter(_pydantic_type(tp), config=pydantic.ConfigDict(coerce_numbers_to_str=True))


def _pydantic_type(tp):
    """``tp`` with our strictness per scalar type (see the module docstring)."""
    import pydantic

    if tp is int:
        return pydantic.StrictInt
    if tp is bool:
        return pydantic.StrictBool
    if tp is float:
        return Annotated[float, pydantic.BeforeValidator(_not_bool), pydantic.AllowInfNan(False)]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return Union[tuple(_pydantic_type(a) for a in args)]
    if origin is list:
        return list[_pydantic_type(args[0])]
    if origin is dict:
        return dict[args[0], _pydantic_type(args[1])]
    return tp


def _message(err: dict, value: Any, tp, key: str, source: str) -> str:
    """One line for pydantic's first error: the item it points at (inside a list or a mapping;
    a union is described as a whole) and what that item must be."""
    loc = tuple(err.get("loc", ()))
    origin = typing.get_origin(tp)
    if origin is not Union and origin is not types.UnionType:
        for part in loc:
            inner = typing.get_origin(tp)
            if inner is list and isinstance(part, int) and isinstance(value, (list, tuple)) and part < len(value):
                tp, value, key = typing.get_args(tp)[0], value[part], f"{key}[{part}]"
            elif inner is dict and isinstance(value, dict) and part in value:
                tp, value, key = typing.get_args(tp)[1], value[part], f"{key}.{part}"
            else:
                break
    what = type_name(tp)
    if typing.get_origin(tp) is Literal:
        what = "one of " + ", ".join(map(str, typing.get_args(tp)))
    elif err.get("type") == "finite_number":
        what = "a finite number"
    return f"{prefix(source)}'{key}' must be {what} (got {value!r})"

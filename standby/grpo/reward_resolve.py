"""Reward functions by name: a built-in, ``module:function`` or ``path/to/file.py:function``; and
the name a callable handed over in Python is known by (its ``__name__``, as TRL names it)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from compilepass.core.errors import ConfigError
from compilepass.standby.grpo.reward_builtins import BUILTIN_REWARDS

__all__ = ["resolve_reward", "callable_name"]


def resolve_reward(name: str) -> Callable[..., Any]:
    """A built-in name, ``module:function`` or ``path/to/file.py:function`` -> the callable.
    Raises ConfigError (one line) for an unknown name, a module that fails to import or a missing
    or non-callable attribute."""
    if ":" not in name:
        if name in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[name]
        raise ConfigError(f"unknown reward {name!r}; valid: {', '.join(BUILTIN_REWARDS)} or module:function")
    module_name, _, attr = name.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"reward {name!r} must look like module:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"reward {name!r}: file {module_name!r} not found")
        mod_key = f"compilepass_reward_{abs(hash(str(path.resolve())))}"
        try:
            spec = importlib.util.spec_from_file_location(mod_key, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_key] = module
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - any import-time failure is the user's, reported in one line
            sys.modules.pop(mod_key, None)
            raise ConfigError(f"reward {name!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                raise ConfigError(f"reward {name!r}: no module named {e.name!r} (is it on PYTHONPATH?)") from None
            raise ConfigError(f"reward {name!r}: importing {module_name!r} failed: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"reward {name!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: {attr!r} in {module_name!r} is not callable")
    return fn


def callable_name(fn: Callable[..., Any]) -> str:
    """A reward callable's name: ``__name__`` (a class instance's own ``__name__`` attribute or its
    class name; a ``functools.partial``'s function's name)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) and name else type(fn).__name__

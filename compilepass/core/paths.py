"""Where compilepass keeps its files: the user cache dir (studies, the user tuning database)."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir

from compilepass.core.errors import StorageError


def cache_path() -> Path:
    """Where the cache dir is (``COMPILEPASS_CACHE_DIR`` or the platform's user cache dir), without
    creating it."""
    return Path(os.environ.get("COMPILEPASS_CACHE_DIR") or user_cache_dir("compilepass"))


def cache_dir() -> Path:
    """:func:`cache_path`, created and checked writable (StorageError, one line, if it is not)."""
    path = cache_path()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StorageError(f"cache directory {path} is not writable ({exc.strerror}); "
                           f"set COMPILEPASS_CACHE_DIR to a writable directory") from None
    return path

"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The new bytes go to ``.<name>.<pid>@<host>.<random>.tmp`` beside the target, are fsynced and renamed
over it. A writer killed before the rename leaves that temp file and the old target;
:func:`sweep_stale_temp_files` removes the temp files whose writer is gone.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from compilepass.core.procs import owner_alive, owner_tag

_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<owner>\d+@[A-Za-z0-9_]+)\.[a-z0-9_]+\.tmp")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Temp files of :func:`write_bytes_atomic` in ``directory`` whose writer no longer runs."""
    try:
        children = list(Path(directory).iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    stale = []
    for child in children:
        m = _TEMP.fullmatch(child.name)
        if m and not owner_alive(m.group("owner")) and child.is_file():
            stale.append(child)
    return stale


def sweep_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Remove the temp files of dead writers in ``directory``; returns what was removed."""
    removed = []
    for path in stale_temp_files(directory):
        try:
            path.unlink()
        except OSError:
            continue  # gone already, or not ours to remove; it does no harm where it is
        removed.append(path)
    return removed

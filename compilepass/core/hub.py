"""Hugging Face Hub ids resolved from the local cache: runs never download.

``cached_snapshot("org/name")`` is the snapshot directory that ``hf download org/name`` (or any
``from_pretrained`` call that downloaded it) left in the Hugging Face cache, found with
``huggingface_hub.snapshot_download(local_files_only=True)``: no network access, ever. A Hub id
that is not cached is a :class:`HubModelNotCachedError` (raised by
:func:`compilepass.core.shapes.local_model_path`) naming the id and the cache directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from compilepass.core.errors import ModelNotFoundError

__all__ = ["HubModelNotCachedError", "cached_snapshot", "hub_cache_dir", "is_repo_id"]


class HubModelNotCachedError(ModelNotFoundError):
    """A Hub id that the local Hugging Face cache does not hold (runs do not download)."""


def hub_cache_dir(cache_dir: Optional[str] = None) -> Path:
    """``cache_dir``, else huggingface_hub's cache (``HF_HUB_CACHE`` / ``HF_HOME``, default
    ``~/.cache/huggingface/hub``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is spelled like a Hub model id (``name`` or ``org/name``), not a path."""
    if not name or name.startswith((".", "~")) or "\\" in name:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cached_snapshot(repo_id: str, cache_dir: Optional[str] = None, revision: Optional[str] = None) -> Optional[Path]:
    """The cached snapshot directory of ``repo_id`` holding a ``config.json``, looked up in the
    cache only (``local_files_only=True``); None when the cache has none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(hub_cache_dir(cache_dir)),
                                      local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if (path / "config.json").is_file() else None

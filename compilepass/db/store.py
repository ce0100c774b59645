"""Database files: parse, check, load, lock, write atomically, merge, and the merged view.

A database file is ``{"schema_version": 1, "db_version": "...", "entries": [...]}``; nothing in it is
code. Two files make the merged view: the shipped one (``tuning_db/shipped.json``, package data) and
the user one (``<cache dir>/tuning_db.json``); a user entry replaces a shipped entry with the same id.

Writes are atomic (:func:`compilepass.core.atomic.write_json_atomic`) and serialized by an ``fcntl`` lock
on ``<file>.lock``: two writers never lose each other's entries, a writer killed mid-write leaves
the previous file intact (and a temp file named after its pid, which
:func:`compilepass.core.atomic.sweep_stale_temp_files` removes once that pid is gone).

Merge rule (``merge_entries``, ``compilepass db merge``): entries with the same id (same key) are one
entry; the one whose ``provenance.date`` is later is kept; on equal dates the incoming one is kept.
Every same-id pair whose content differs is reported as a conflict.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from compilepass.core.atomic import write_json_atomic
from compilepass.core.errors import CompilepassError
from compilepass.core.paths import cache_dir
from compilepass.core.procs import owner_tag
from compilepass.db.keys import TuneKey

SCHEMA_VERSION = 1
USER_DB_NAME = "tuning_db.json"
SHIPPED_DB_NAME = "shipped.json"


class DatabaseError(CompilepassError):
    pass


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_date(value: Any) -> _dt.datetime:
    try:
        d = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    return d if d.tzinfo else d.replace(tzinfo=_dt.timezone.utc)


def empty_db(db_version: Optional[str] = None) -> dict:
    return {"schema_version": SCHEMA_VERSION, "db_version": db_version or now_iso(), "entries": []}


def user_db_path() -> Path:
    """``<cache dir>/tuning_db.json`` (``COMPILEPASS_CACHE_DIR`` overrides the cache dir)."""
    return cache_dir() / USER_DB_NAME


def shipped_db_path() -> Path:
    """The shipped database inside the installed package (``compilepass.tuning_db``)."""
    return Path(str(files("compilepass.tuning_db") / SHIPPED_DB_NAME))


REQUIRED_ENTRY_FIELDS = ("id", "key", "flags", "decision", "measurements", "provenance")


def parse_db(text: str, source: str) -> dict:
    """Parse and check a database document; errors name ``source``."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatabaseError(f"tuning database {source} is corrupt (not valid JSON: {exc.msg} at line "
                            f"{exc.lineno}); fix or remove it") from None
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise DatabaseError(f"tuning database {source} has no schema_version; it is not a compilepass "
                            f"tuning database")
    schema = doc["schema_version"]
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise DatabaseError(f"tuning database {source} has an unknown schema_version {schema!r}")
    if schema > SCHEMA_VERSION:
        raise DatabaseError(f"tuning database {source} has schema_version {schema}, newer than this compilepass "
                            f"reads ({SCHEMA_VERSION}); upgrade compilepass or move the file away")
    if schema < 1:
        raise DatabaseError(f"tuning database {source} has an unknown schema_version {schema!r}")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise DatabaseError(f"tuning database {source} is corrupt: 'entries' is not a list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatabaseError(f"tuning database {source} is corrupt: entry {i} is not an object")
        missing = [f for f in REQUIRED_ENTRY_FIELDS if f not in entry]
        if missing:
            raise DatabaseError(f"tuning database {source} is corrupt: entry {i} lacks {', '.join(missing)}")
        if not isinstance(entry["flags"], dict):
            raise DatabaseError(f"tuning database {source} is corrupt: entry {i} flags is not an object")
        try:
            TuneKey.from_dict(entry["key"])
        except (KeyError, TypeError) as exc:
            raise DatabaseError(f"tuning database {source} is corrupt: entry {i} has a bad key ({exc})") from None
    doc.setdefault("db_version", "")
    return doc


def load_db(path: Union[str, os.PathLike], missing_ok: bool = True) -> dict:
    """Read a database file. A missing file is an empty database when ``missing_ok``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return empty_db("")
        raise DatabaseError(f"tuning database {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise DatabaseError(f"cannot read tuning database {path}: {exc}") from None
    return parse_db(text, str(path))


def check_db_writable(path: Union[str, os.PathLike]) -> dict:
    """Read and parse the database at ``path`` (missing: empty) and prove that a write would go
    through (its lock can be taken, a temp file created beside it). Returns the parsed document;
    DatabaseError naming ``path`` otherwise."""
    path = Path(path)
    doc = load_db(path)
    with locked(path):
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent)
        except OSError as exc:
            raise DatabaseError(f"cannot write tuning database {path}: {exc.strerror}") from None
        os.close(fd)
        os.unlink(probe)
    return doc


def load_shipped() -> dict:
    path = shipped_db_path()
    if not path.is_file():
        return empty_db("")
    return parse_db(path.read_text(), str(path))


@contextlib.contextmanager
def locked(path: Union[str, os.PathLike]):
    """An exclusive ``fcntl`` lock on ``<path>.lock`` for a read-modify-write of ``path``."""
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DatabaseError(f"cannot lock tuning database {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def save_db(path: Union[str, os.PathLike], doc: dict) -> None:
    doc = dict(doc, schema_version=SCHEMA_VERSION)
    doc["entries"] = sorted(doc["entries"], key=lambda e: e["id"])
    write_json_atomic(path, doc)


def merge_entries(existing: Iterable[dict], incoming: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """Same id (= same key): keep the later ``provenance.date``; on equal dates keep the incoming one.
    Returns (entries, conflicts); a conflict is a same-id pair whose content differs."""
    by_id: dict[str, dict] = {}
    for e in existing:
        by_id[e["id"]] = e
    conflicts = []
    for e in incoming:
        old = by_id.get(e["id"])
        if old is None:
            by_id[e["id"]] = e
            continue
        if old == e:
            continue
        new_date, old_date = parse_date(e["provenance"].get("date")), parse_date(old["provenance"].get("date"))
        keep = e if new_date >= old_date else old
        conflicts.append({"id": e["id"], "kept_date": keep["provenance"].get("date"),
                          "dropped_date": (old if keep is e else e)["provenance"].get("date"),
                          "kept": "incoming" if keep is e else "existing"})
        by_id[e["id"]] = keep
    return list(by_id.values()), conflicts


def add_entries(path: Union[str, os.PathLike], entries: Iterable[dict]) -> list[dict]:
    """Merge ``entries`` into the file at ``path`` under its lock (created if missing). Returns conflicts."""
    entries = list(entries)
    with locked(path):
        doc = load_db(path)
        merged, conflicts = merge_entries(doc["entries"], entries)
        save_db(path, dict(doc, db_version=now_iso(), entries=merged))
    return conflicts


def remove_entry(path: Union[str, os.PathLike], entry_id: str) -> dict:
    """Remove the entry whose id is (or starts with) ``entry_id`` from the file at ``path``, under its
    lock, atomically. Returns the removed entry; raises DatabaseError if none or several match."""
    with locked(path):
        doc = load_db(path, missing_ok=False)
        entry, _ = find_entry([(e, str(path)) for e in doc["entries"]], entry_id)
        save_db(path, dict(doc, db_version=now_iso(),
                           entries=[e for e in doc["entries"] if e["id"] != entry["id"]]))
    return entry


def merged_view(user_path: Optional[Union[str, os.PathLike]] = None, include_shipped: bool = True,
                include_user: bool = True) -> list[tuple[dict, str]]:
    """(entry, source) pairs: shipped entries, replaced by user entries with the same id."""
    rows: dict[str, tuple[dict, str]] = {}
    if include_shipped:
        for e in load_shipped()["entries"]:
            rows[e["id"]] = (e, "shipped")
    if include_user:
        path = Path(user_path) if user_path is not None else user_db_path()
        for e in load_db(path)["entries"]:
            rows[e["id"]] = (e, f"user ({path})")
    return list(rows.values())


def find_entry(rows: list[tuple[dict, str]], entry_id: str) -> tuple[dict, str]:
    hits = [r for r in rows if r[0]["id"].startswith(entry_id)] if entry_id else []
    if not hits:
        raise DatabaseError(f"no entry with id {entry_id!r} (see `compilepass db list`)")
    if len(hits) > 1:
        raise DatabaseError(f"id prefix {entry_id!r} is ambiguous: {', '.join(r[0]['id'] for r in hits)}")
    return hits[0]



"""The tuning database: verified tune results as JSON data, and lookup with an explained fallback.

A database file is ``{"schema_version": 1, "db_version": "...", "entries": [...]}``; nothing in it is
code. One entry per tune result, a verified winner or "keep defaults" (flags ``{}``), with its full key
(versions, GPU, model signature, engine, workload and size bucket, policy), the flags, the decision
text, the measurements and the provenance (date, compilepass version, exact command, study name).

Two files make the merged view: the shipped one (``tuning_db/shipped.json``, package data) and the
user one (``<cache dir>/tuning_db.json``); a user entry replaces a shipped entry with the same id.
An entry id is a short stable hash of its key.

Writes are atomic (:func:`compilepass.atomic.write_json_atomic`) and serialized by an ``fcntl`` lock
on ``<file>.lock``: two writers never lose each other's entries, a writer killed mid-write leaves
the previous file intact.

Merge rule (``merge_entries``, ``compilepass db merge``): entries with the same id (same key) are one
entry; the one whose ``provenance.date`` is later is kept; on equal dates the incoming one is kept.
Every same-id pair whose content differs is reported as a conflict.

Lookup (:func:`lookup`) tries, in order, and explains which level matched:

1. ``exact``: the same key.
2. ``nearby-bucket``: the same key but another size bucket of the same workload kind, the nearest
   one (every known dimension within 4x).
3. ``similar-model``: the same model family, parameter count within 2x, same GPU, torch, workload kind.
4. ``same-torch-arch``: the same torch minor ("2.11") and GPU architecture (compute capability major,
   or "cpu") and workload kind.
5. ``safe-defaults``: the curated table :data:`SAFE_DEFAULTS` for the torch minor: torch's own
   defaults (``{}``) unless an entry there is justified; nothing unmeasured is shipped.

Engine and policy are never mixed: flags measured for the native engine are not offered to vLLM,
and a "throughput" entry (compile time allowed to grow) is not offered to a "balanced" caller.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from .atomic import write_json_atomic
from .env import EnvironmentKey
from .errors import CompilepassError

SCHEMA_VERSION = 1
USER_DB_NAME = "tuning_db.json"
SHIPPED_DB_NAME = "shipped.json"
ENGINES = ("native", "vllm")
POLICIES = ("balanced", "throughput")

LEVEL_NAMES = {1: "exact", 2: "nearby-bucket", 3: "similar-model", 4: "same-torch-arch", 5: "safe-defaults"}

#: Curated flags per torch minor when nothing measured applies. Deliberately empty: every flag set we
#: know of changes speed by GPU, model and version (e.g. triton.cudagraphs is 3x on H100 rollout
#: only together with other flags and doubles compile time), so the safe answer is torch's defaults.
SAFE_DEFAULTS: dict[str, dict] = {}

NEARBY_FACTOR = 4.0  # level 2: every known size dimension within this factor
SIMILAR_PARAMS = 2.0  # level 3: parameter count within this factor


class DatabaseError(CompilepassError):
    pass


class NotRecordable(CompilepassError):
    """A tune result that must not become an entry (no verification, nothing measured)."""


# -- keys -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSignature:
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    dtype: str
    head_dim: Optional[int] = None
    intermediate_size: Optional[int] = None

    @classmethod
    def from_shape(cls, shape, dtype: str) -> "ModelSignature":
        return cls(family=shape.family, num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                   num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, vocab_size=shape.vocab_size,
                   dtype=dtype_name(dtype), head_dim=shape.head_dim, intermediate_size=shape.intermediate_size)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelSignature":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)

    def parameters(self) -> int:
        """Parameter count estimated from the shape (embedding + layers; norms ignored)."""
        head_dim = self.head_dim or self.hidden_size // self.num_heads
        inter = self.intermediate_size or 4 * self.hidden_size
        attn = self.hidden_size * head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * inter
        return self.vocab_size * self.hidden_size + self.num_layers * (attn + mlp)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class TuneKey:
    """What a measurement depends on. ``vllm`` only counts for engine "vllm"."""

    torch: str
    triton: Optional[str]
    vllm: Optional[str]
    cuda: Optional[str]
    device_name: str
    compute_capability: Optional[str]
    model: ModelSignature
    engine: str
    workload: str
    bucket: str
    policy: str = "balanced"

    @classmethod
    def build(cls, env: Union[EnvironmentKey, Mapping], model: ModelSignature, workload: str, bucket: str,
              engine: str = "native", policy: str = "balanced") -> "TuneKey":
        e = env.to_dict() if isinstance(env, EnvironmentKey) else dict(env)
        return cls(torch=e["torch"], triton=e.get("triton"), vllm=e.get("vllm"), cuda=e.get("cuda"),
                   device_name=e["device_name"], compute_capability=e.get("compute_capability"), model=model,
                   engine=engine, workload=workload, bucket=bucket, policy=policy)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TuneKey":
        d = dict(d)
        d["model"] = ModelSignature.from_dict(d["model"])
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    def entry_id(self) -> str:
        d = self.to_dict()
        if self.engine != "vllm":
            d["vllm"] = None  # the native engine does not depend on vLLM
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def torch_minor(self) -> str:
        return torch_minor(self.torch)

    @property
    def arch(self) -> str:
        return arch_of(self.compute_capability)

    def same_environment(self, other: "TuneKey") -> bool:
        fields = ["torch", "triton", "cuda", "device_name", "compute_capability"]
        if self.engine == "vllm":
            fields.append("vllm")
        return all(getattr(self, f) == getattr(other, f) for f in fields)


def torch_minor(version: str) -> str:
    return ".".join(str(version).split("+")[0].split(".")[:2])


def arch_of(compute_capability: Optional[str]) -> str:
    return f"sm{str(compute_capability).split('.')[0]}" if compute_capability else "cpu"


def parse_bucket(bucket: str) -> dict[str, int]:
    """``"b32-p128-n256"`` -> ``{"b": 32, "p": 128, "n": 256}`` (unknown parts are skipped)."""
    out = {}
    for part in str(bucket).split("-"):
        if len(part) >= 2 and part[0].isalpha() and part[1:].isdigit():
            out[part[0]] = int(part[1:])
    return out


def bucket_distance(query: Mapping[str, Optional[int]], bucket: str) -> Optional[float]:
    """Sum of |log2| ratios over the dimensions the query knows; None if the entry lacks one."""
    have = parse_bucket(bucket)
    total = 0.0
    for name, value in query.items():
        if value is None:
            continue
        if name not in have or have[name] < 1 or value < 1:
            return None
        total += abs(math.log2(value / have[name]))
    return total


def bucket_within(query: Mapping[str, Optional[int]], bucket: str, factor: float) -> bool:
    have = parse_bucket(bucket)
    for name, value in query.items():
        if value is None:
            continue
        if name not in have or abs(math.log2(value / have[name])) > math.log2(factor) + 1e-9:
            return False
    return True


def bucket_dims(kind: str, batch=None, prompt_len=None, new_tokens=None, seq_len=None, lora_rank=None) -> dict:
    """The size dimensions of a workload kind (None = unknown), named as in ``WorkloadSpec.size_bucket``."""
    if kind == "rollout":
        return {"b": batch, "p": prompt_len, "n": new_tokens}
    if kind == "train":
        return {"b": batch, "t": seq_len, "r": lora_rank}
    return {"b": batch}


def bucket_string(dims: Mapping[str, Optional[int]]) -> Optional[str]:
    if any(v is None for v in dims.values()):
        return None
    return "-".join(f"{k}{v}" for k, v in dims.items())


# -- files ------------------------------------------------------------------------------------------


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _parse_date(value: Any) -> _dt.datetime:
    try:
        d = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    return d if d.tzinfo else d.replace(tzinfo=_dt.timezone.utc)


def empty_db(db_version: Optional[str] = None) -> dict:
    return {"schema_version": SCHEMA_VERSION, "db_version": db_version or now_iso(), "entries": []}


def user_db_path() -> Path:
    """``<cache dir>/tuning_db.json`` (``COMPILEPASS_CACHE_DIR`` overrides the cache dir)."""
    from .search import cache_dir

    return cache_dir() / USER_DB_NAME


def shipped_db_path() -> Path:
    """The shipped database inside the installed package (``compilepass.tuning_db``)."""
    from importlib.resources import files

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


def load_shipped() -> dict:
    path = shipped_db_path()
    if not path.is_file():
        return empty_db("")
    return parse_db(path.read_text(), str(path))


@contextlib.contextmanager
def locked(path: Union[str, os.PathLike]):
    """An exclusive ``fcntl`` lock on ``<path>.lock`` for a read-modify-write of ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    try:
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
        new_date, old_date = _parse_date(e["provenance"].get("date")), _parse_date(old["provenance"].get("date"))
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


# -- entries from tune results ----------------------------------------------------------------------


def _option_value(command: str, name: str) -> Optional[str]:
    try:
        argv = shlex.split(command or "")
    except ValueError:
        argv = (command or "").split()
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _has_option(command: str, name: str) -> bool:
    try:
        return name in shlex.split(command or "")
    except ValueError:
        return name in (command or "").split()


def resolved_dtype_name(workload: Mapping, env: Mapping) -> str:
    """The dtype a tune measured: ``auto`` is bfloat16 on CUDA, float32 on CPU (as WorkloadSpec)."""
    dtype = workload.get("dtype", "auto")
    if dtype != "auto":
        return dtype
    device = workload.get("device", "auto")
    cuda = device.startswith("cuda") if device != "auto" else bool(env.get("compute_capability"))
    return "bfloat16" if cuda else "float32"


def shape_for(model: str):
    """ModelShape of a preset name or a local Hugging Face directory."""
    from compilepass.standby.models import PRESETS, ModelShape, resolve_model_source

    if model in PRESETS:
        return PRESETS[model]
    resolve_model_source(model)  # ModelNotFoundError, one line
    from transformers import AutoConfig

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(model))


def _as_dict(result) -> dict:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if not isinstance(result, Mapping):
        raise NotRecordable(f"not a tune result: {type(result).__name__}")
    return dict(result)


def entry_from_tune_result(result, *, policy: Optional[str] = None, engine: str = "native",
                           note: Optional[str] = None, date: Optional[str] = None,
                           model_shape=None) -> dict:
    """A database entry from a tune result (a ``TuneResult`` or its JSON dict).

    Refuses (``NotRecordable``) results that must not be recorded: a ``--no-verify`` run, a
    verification that did not complete, a run whose defaults trial failed. ``policy`` defaults to
    the ``--policy`` in the result's command, else "balanced".
    """
    r = _as_dict(result)
    for k in ("environment", "workload", "command", "decision", "study_name"):
        if k not in r:
            raise NotRecordable(f"not a compilepass tune result: no {k!r} field")
    command = r.get("command") or ""
    verification = r.get("verification")
    candidates = r.get("candidates") or []
    if _has_option(command, "--no-verify") or (verification is None and candidates):
        raise NotRecordable("not recorded: the run skipped verification (--no-verify), so it declares no winner")
    if r.get("defaults") is None:
        raise NotRecordable("not recorded: the defaults trial did not complete, nothing was measured against it")
    if verification is not None and verification.get("status") != "ok":
        raise NotRecordable("not recorded: the verification round did not complete")
    policy = policy or _option_value(command, "--policy") or "balanced"
    if policy not in POLICIES:
        raise NotRecordable(f"unknown policy {policy!r}")
    if engine not in ENGINES:
        raise NotRecordable(f"unknown engine {engine!r}")

    env, wl = dict(r["environment"]), r["workload"]
    if str(wl.get("device", "auto")).startswith("cpu") and env.get("compute_capability"):
        # measured on the CPU of a GPU machine: the key is the CPU's (as select() builds it for a CPU model)
        import platform

        env.update(device_name="cpu:" + (platform.processor() or platform.machine()), compute_capability=None)
    from .workloads import WorkloadSpec

    spec = WorkloadSpec.from_dict(wl)
    shape = model_shape or shape_for(spec.model)
    signature = ModelSignature.from_shape(shape, resolved_dtype_name(wl, env))
    key = TuneKey.build(env, signature, spec.kind, spec.size_bucket(), engine=engine, policy=policy)

    winner = r.get("winner")
    flags = dict(winner) if winner else {}
    defaults = r["defaults"]
    m: dict[str, Any] = {
        "defaults_compile_s": defaults.get("compile_s"),
        "defaults_throughput": defaults.get("throughput"),
        "winner_compile_s": None, "winner_throughput": None, "compile_ratio": None,
        "ratio": None, "ratio_ci_low": None, "ratio_ci_high": None,
        "verify_rounds": None,
        "verified_repeats": None,
        "defaults_compile_s_in_process": None, "winner_compile_s_in_process": None,
        "best_candidate": None,
    }
    if verification is not None:
        m["verify_rounds"] = len(verification.get("defaults_throughput") or [])
        m["defaults_compile_s_in_process"] = verification.get("defaults_compile_s_in_process")
        m["verified_repeats"] = {"defaults": verification.get("defaults_throughput"), "winner": None}
    if winner:
        row = next((c for c in candidates if c.get("flags") == winner), None)
        verdict = next((c for c in (verification or {}).get("candidates", []) if c.get("flags") == winner), None)
        if row is None or verdict is None or not row.get("verified_ratio"):
            raise NotRecordable("not recorded: the winner has no verified measurement in the result")
        ci = row["verified_ratio"]
        m.update(winner_compile_s=row.get("compile_s"), winner_throughput=row.get("throughput"),
                 compile_ratio=row.get("compile_ratio"), ratio=ci["ratio"], ratio_ci_low=ci["low"],
                 ratio_ci_high=ci["high"], verify_rounds=ci.get("n", m["verify_rounds"]),
                 winner_compile_s_in_process=verdict.get("compile_s_in_process"))
        m["verified_repeats"]["winner"] = verdict.get("throughput")
    else:
        measured = [c for c in candidates if c.get("verified_ratio")]
        if measured:
            best = max(measured, key=lambda c: c["verified_ratio"]["ratio"])
            ci = best["verified_ratio"]
            m["best_candidate"] = {"flags": best["flags"], "ratio": ci["ratio"], "ratio_ci_low": ci["low"],
                                   "ratio_ci_high": ci["high"], "compile_ratio": best.get("compile_ratio")}

    from . import __version__

    return {
        "id": key.entry_id(),
        "key": key.to_dict(),
        "policy": policy,
        "verdict": "winner" if flags else "keep-defaults",
        "flags": flags,
        "decision": r["decision"],
        "model_name": spec.model if os.sep not in spec.model else Path(spec.model).name,
        "workload_spec": wl,
        "measurements": m,
        "provenance": {
            "date": date or now_iso(),
            "compilepass_version": __version__,
            "command": command,
            "study_name": r["study_name"],
            "environment": r["environment"],
            "note": note,
        },
    }


def record_tune_result(result, path: Optional[Union[str, os.PathLike]] = None, *, policy: Optional[str] = None,
                       engine: str = "native", note: Optional[str] = None) -> dict:
    """Add a tune result to the user database (or ``path``). Returns the entry written."""
    entry = entry_from_tune_result(result, policy=policy, engine=engine, note=note)
    add_entries(path if path is not None else user_db_path(), [entry])
    return entry


# -- lookup -----------------------------------------------------------------------------------------


@dataclass
class Match:
    entry: Optional[dict]
    flags: dict
    level: int
    reason: str
    source: str = ""

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES[self.level]

    @property
    def entry_id(self) -> Optional[str]:
        return None if self.entry is None else self.entry["id"]


@dataclass
class Query:
    """What a caller wants flags for: the key with a possibly partial size bucket."""

    key: TuneKey  # bucket may be "" when some size is unknown
    dims: dict = field(default_factory=dict)  # known/unknown size dimensions


def _describe(entry: dict) -> str:
    k = entry["key"]
    what = "keep defaults" if not entry["flags"] else f"{len(entry['flags'])} flags"
    return (f"entry {entry['id']} ({entry.get('model_name', k['model']['family'])} {k['workload']} {k['bucket']}, "
            f"{k['device_name']}, torch {k['torch']}, {entry.get('policy', k.get('policy'))}: {what})")


def _newest(rows):
    return max(rows, key=lambda r: _parse_date(r[0]["provenance"].get("date")))


def lookup(query: Union[Query, TuneKey], entries: Optional[list] = None) -> Match:
    """The best entry for ``query`` with the fallback chain of the module docstring.

    ``entries`` is a list of entries or (entry, source) pairs; default: the merged view.
    """
    if isinstance(query, TuneKey):
        query = Query(query, bucket_dims_from_string(query.workload, query.bucket))
    q = query.key
    rows = merged_view() if entries is None else [e if isinstance(e, tuple) else (e, "") for e in entries]
    parsed = []
    for e, src in rows:
        try:
            parsed.append((e, src, TuneKey.from_dict(e["key"])))
        except (KeyError, TypeError):
            continue
    pool = [(e, s, k) for e, s, k in parsed if k.engine == q.engine and k.policy == q.policy and k.workload == q.workload]

    def pick(cands, sort_key):
        if not cands:
            return None
        best = min(sort_key(c) for c in cands)
        tied = [c for c in cands if sort_key(c) == best]
        return max(tied, key=lambda c: _parse_date(c[0]["provenance"].get("date")))

    def found(level, c, why):
        e, src, _ = c
        return Match(e, dict(e["flags"]), level, f"{LEVEL_NAMES[level]}: {_describe(e)}; {why}", src)

    # 1. exact
    if q.bucket:
        exact = [c for c in pool if c[2].same_environment(q) and c[2].model == q.model and c[2].bucket == q.bucket]
        if exact:
            return found(1, pick(exact, lambda c: 0), "same versions, GPU, model, workload and size")
    # 2. nearby bucket
    same = [c for c in pool if c[2].same_environment(q) and c[2].model == q.model
            and bucket_distance(query.dims, c[2].bucket) is not None
            and bucket_within(query.dims, c[2].bucket, NEARBY_FACTOR)]
    if same:
        c = pick(same, lambda c: bucket_distance(query.dims, c[2].bucket))
        known = {k: v for k, v in query.dims.items() if v is not None}
        asked = ", ".join(f"{k}={v}" for k, v in known.items()) or "no sizes given"
        return found(2, c, f"same versions, GPU and model; nearest size bucket to {asked}")
    # 3. same family and size class, same GPU/torch
    qp = q.model.parameters()

    def pratio(c):
        return abs(math.log(c[2].model.parameters() / qp))

    similar = [c for c in pool if c[2].device_name == q.device_name and c[2].torch == q.torch
               and c[2].model.family == q.model.family and c[2].model.dtype == q.model.dtype
               and pratio(c) <= math.log(SIMILAR_PARAMS) + 1e-9]
    if similar:
        c = pick(similar, lambda c: (round(pratio(c), 6), bucket_distance(query.dims, c[2].bucket) or 0.0))
        return found(3, c, f"same GPU and torch, {q.model.family} with {c[2].model.parameters() / 1e6:.0f}M "
                           f"parameters vs {qp / 1e6:.0f}M (within {SIMILAR_PARAMS:g}x)")
    # 4. same torch minor and GPU architecture
    arch = [c for c in pool if c[2].torch_minor == q.torch_minor and c[2].arch == q.arch]
    if arch:
        c = pick(arch, lambda c: (c[2].device_name != q.device_name, c[2].model.family != q.model.family,
                                  round(pratio(c), 6), bucket_distance(query.dims, c[2].bucket) or 0.0))
        return found(4, c, f"same torch minor {q.torch_minor} and GPU architecture {q.arch}; no entry for this "
                           f"GPU/model")
    # 5. curated safe defaults
    flags = dict(SAFE_DEFAULTS.get(q.torch_minor, {}))
    others = [c for c in parsed if c[2].policy != q.policy and c[2].engine == q.engine
              and c[2].workload == q.workload and c[2].same_environment(q) and c[2].model == q.model]
    hint = f"; {len(others)} entry for policy {others[0][2].policy!r} exists (not used)" if others else ""
    reason = (f"{LEVEL_NAMES[5]}: no measured {q.engine} {q.workload} entry ({q.policy}) for torch {q.torch_minor} "
              f"on {q.arch}; using " + ("curated flags" if flags else "torch's own defaults (no flags)") + hint)
    return Match(None, flags, 5, reason, "curated")


def bucket_dims_from_string(kind: str, bucket: str) -> dict:
    parsed = parse_bucket(bucket)
    names = bucket_dims(kind).keys()
    return {n: parsed.get(n) for n in names}

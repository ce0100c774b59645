"""Atomic, resumable GRPO checkpoints.

Layout under a checkpoint directory (normally ``run.output_dir``)::

    step-00000050/
        adapter_model.safetensors, adapter_config.json   # model.save_pretrained (peft format)
        trainer_state.pt      # optimizer, scheduler, RNG states, step, data position, extra
        meta.json             # step, time, versions, config, the last metrics lines
    latest                    # "step-00000050\\n", replaced atomically after each save

``meta.json`` records the size and sha256 of every other file (``files``), so a truncated or
corrupt checkpoint is recognised before anything is loaded from it (:func:`verify_checkpoint`).

A save writes everything into ``.tmp-step-XXXXXXXX-<random>/`` in the same directory, fsyncs
every file and the directory, renames it to ``step-XXXXXXXX`` (the commit point), fsyncs the
parent, then rewrites ``latest`` atomically and deletes all but the newest ``keep_last``
checkpoints. A process killed at any moment leaves either the previous checkpoint as the newest
complete one, or the new one; a leftover ``.tmp-step-*`` directory is never read and is deleted by
the next save or load (:func:`cleanup_partial`).

``trainer_state.pt`` holds only tensors, numbers, strings, bools, None, lists, tuples and dicts,
so it loads with ``torch.load(weights_only=True)``: RNG states are converted (Python's
``random.getstate()`` tuple -> lists, numpy's state -> a tensor).

:func:`load_checkpoint` restores the adapter weights *in place* into the existing peft model
(``set_peft_model_state_dict``; parameters keep their storage, so an engine holding the same
modules and CUDA graphs over them stays valid), then the optimizer, scheduler and RNG states. It
verifies the checkpoint first: a bad one is a one-line :class:`CheckpointError`.
:func:`find_latest_valid` (``run.resume=auto``) returns the newest checkpoint that verifies and
the newer ones it passed over, with the reason; it changes nothing on disk.

A save that fails (disk full, a file-size limit, an I/O error) removes its temp directory and
raises :class:`CheckpointError` naming the checkpoint that is still the newest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from compilepass.core.atomic import write_bytes_atomic
from compilepass.core.errors import CompilepassError

__all__ = [
    "CheckpointError", "CheckpointState", "save_checkpoint", "load_checkpoint", "find_latest",
    "find_latest_valid", "verify_checkpoint", "list_checkpoints", "cleanup_partial", "capture_rng_state",
    "restore_rng_state", "checkpoint_name", "FORMAT_VERSION",
]

FORMAT_VERSION = 1
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-step-"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")

class CheckpointError(CompilepassError):
    """No checkpoint where one was expected, one that does not verify or does not match the model,
    or a save that failed. ``reason``: what :func:`verify_checkpoint` found wrong, else None."""

    def __init__(self, message: str, reason: Optional[str] = None):
        super().__init__(message)
        self.reason = reason


@dataclass
class CheckpointState:
    """What :func:`load_checkpoint` returns (the model, optimizer, scheduler and RNG are already
    restored when it returns)."""

    path: Path
    step: int
    data_state: Optional[dict]
    meta: dict
    extra: dict = field(default_factory=dict)
    rng_states: Optional[dict] = None


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):08d}"


# ------------------------------------------------------------------------------------------------
# RNG states as weights_only-loadable data


def capture_rng_state() -> dict[str, Any]:
    """Python ``random``, numpy's global RNG (if numpy is imported), torch CPU and every CUDA device
    (if CUDA is initialized), as tensors / lists / numbers."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": {"version": version, "state": list(internal), "gauss_next": gauss},
                             "torch_cpu": torch.get_rng_state()}
    np = _numpy_if_imported()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; parts missing from ``state`` are left alone. CUDA
    states are restored only when CUDA is available with the same number of devices."""
    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].to(torch.uint8).cpu())
    if "numpy" in state:
        np = _numpy_if_imported(force=True)
        if np is not None:
            s = state["numpy"]
            np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), int(s["pos"]), int(s["has_gauss"]),
                                 float(s["cached_gaussian"])))
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in cuda_states])


def _numpy_if_imported(force: bool = False):
    import sys

    if "numpy" in sys.modules or force:
        try:
            import numpy

            return numpy
        except ImportError:  # pragma: no cover
            return None
    return None


# ------------------------------------------------------------------------------------------------
# Discovery


def _is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / META_FILE).is_file() and (path / ADAPTER_FILE).is_file()


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete ``step-*`` checkpoints in ``directory`` as (step, path), oldest first.
    Temp directories and incomplete ones are ignored."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = []
    for child in d.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and _is_complete(child):
            out.append((int(m.group(1)), child))
    return sorted(out)


def find_latest(directory: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint in ``directory`` (a run's output dir), or None.

    The ``latest`` file is a pointer kept for people and tools; this function returns the complete
    checkpoint with the highest step, which is the same one unless the process died between the
    rename and the pointer update (then the renamed, complete checkpoint is the newer one)."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def find_latest_valid(directory: str | os.PathLike) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest checkpoint in ``directory`` that passes :func:`verify_checkpoint`, and the newer
    ``step-*`` directories passed over as ``(path, reason)``, newest first (an incomplete one
    included). ``(None, [])``: no checkpoint at all; ``(None, skipped)``: none verifies."""
    d = Path(directory)
    if not d.is_dir():
        return None, []
    steps = sorted(((int(m.group(1)), child) for child in d.iterdir()
                    if (m := _STEP_DIR.match(child.name)) and child.is_dir()), reverse=True)
    skipped = []
    for _, path in steps:
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            skipped.append((path, e.reason))
            continue
        return path, skipped
    return None, skipped


def cleanup_partial(directory: str | os.PathLike) -> list[Path]:
    """Delete ``.tmp-step-*`` directories and stale ``latest`` temp files left by a killed save.
    Call only while no other process saves into ``directory``. Returns what was removed."""
    d = Path(directory)
    removed = []
    if not d.is_dir():
        return removed
    for child in d.iterdir():
        if child.name.startswith(TMP_PREFIX) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
        elif child.name.startswith(f".{LATEST_FILE}.") and child.name.endswith(".tmp"):
            child.unlink(missing_ok=True)
            removed.append(child)
    return removed


# ------------------------------------------------------------------------------------------------
# Save


def _fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list: what makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _adapter_state_dict(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    model,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    rng_states: Optional[dict] = None,
    data_state: Optional[dict] = None,
    config_dict: Optional[dict] = None,
    metrics_tail: Optional[list] = None,
    extra: Optional[dict] = None,
    keep_last: int = 3,
    on_stage: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write ``directory/step-XXXXXXXX/`` atomically and return its path.

    ``model``: the peft model (its adapter is saved with ``save_pretrained``, safetensors).
    ``rng_states``: from :func:`capture_rng_state`; None captures them now. ``data_state``:
    ``PromptBatcher.state_dict()``. ``config_dict``: ``GRPOConfig.to_dict()``. ``metrics_tail``:
    the last few metrics records (JSON-able). ``extra``: more trainer state (tensors and plain
    data only). An existing checkpoint of the same step is replaced, and checkpoints of *later*
    steps (left by a run that this one resumed from an earlier checkpoint) are deleted. Afterwards
    only the newest ``keep_last`` checkpoints remain. ``on_stage(name)`` is called as the save
    progresses ("adapter", "state", "meta", "fsynced", "renamed", "latest"; the tests kill the
    process there to show that a crash at any point leaves a loadable checkpoint).
    """
    stage = on_stage or (lambda name: None)
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise CheckpointError(f"keep_last must be an integer >= 1 (got {keep_last!r})")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cleanup_partial(d)
    name = checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{int(step):08d}-", dir=d))
    writing = ADAPTER_FILE  # named in the error of a failed write
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if not (tmp / ADAPTER_FILE).is_file():
            raise CheckpointError(f"model.save_pretrained did not write {ADAPTER_FILE} (is the model a peft model?)")
        stage("adapter")
        state = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_states if rng_states is not None else capture_rng_state(),
            "data": data_state,
            "extra": extra or {},
        }
        writing = STATE_FILE
        torch.save(state, tmp / STATE_FILE)
        stage("state")
        meta = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
            "config": config_dict,
            "metrics_tail": metrics_tail or [],
        }
        meta["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                         for f in (tmp / ADAPTER_FILE, tmp / ADAPTER_CONFIG_FILE, tmp / STATE_FILE) if f.is_file()}
        writing = META_FILE
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        stage("meta")
        writing = "the checkpoint directory"
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        stage("fsynced")
        final = d / name
        # Checkpoints of later steps belong to a run that was resumed from an earlier point (their
        # metrics were truncated too); they would shadow this one, so they go first.
        for later_step, later in list_checkpoints(d):
            if later_step > step:
                _remove_checkpoint(later)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{int(step):08d}-old-", dir=d))
            os.rename(final, trash / name)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync(d)
        stage("renamed")
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        newest = find_latest(d)
        still = f"{newest.name} is still the newest checkpoint" if newest is not None else "no checkpoint was kept"
        raise CheckpointError(f"cannot write checkpoint {name} in {d}: writing {writing} failed ({one_line(e)}"
                              f"{_write_limits(d)}); {still}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        write_bytes_atomic(d / LATEST_FILE, (name + "\n").encode())
    except OSError as e:  # the checkpoint itself is committed; only the pointer for people and tools is stale
        raise CheckpointError(f"checkpoint {final} was written, but updating {d / LATEST_FILE} failed: "
                              f"{one_line(e)}") from None
    stage("latest")
    for _, old in list_checkpoints(d)[:-keep_last]:
        _remove_checkpoint(old)
    return final


def _remove_checkpoint(path: Path) -> None:
    """Rename to a temp name first (atomic), so a kill mid-delete never leaves a half checkpoint
    that looks complete."""
    trash = path.parent / f"{TMP_PREFIX}{path.name[len('step-'):]}-del-{os.getpid()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _write_limits(d: Path) -> str:
    """What may have stopped a write, as facts: a file-size limit, a nearly full file system
    (torch.save reports neither by name)."""
    import resource

    out = []
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY:
        out.append(f"the file-size limit (RLIMIT_FSIZE, ulimit -f) is {soft} bytes")
    try:
        st = os.statvfs(d)
        free = st.f_bavail * st.f_frsize
        if free < 64 * 2**20:
            out.append(f"{d} has {free / 2**20:.1f} MiB free")
    except OSError:
        pass
    return "".join(f"; {x}" for x in out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def one_line(e: BaseException, limit: int = 240) -> str:
    """``Type: message`` on one line: torch's multi-line messages keep their most specific line."""
    text = str(e)
    for marker in ("WeightsUnpickler error:",):
        if marker in text:
            text = text[text.index(marker):].splitlines()[0]
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for mod in ("peft", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover  # noqa: BLE001
            pass
    return out


# ------------------------------------------------------------------------------------------------
# Load


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A ``step-*`` directory, its parent (the newest complete checkpoint in it) or a ``latest``
    file -> the checkpoint directory (not yet verified). Raises CheckpointError when there is none."""
    p = Path(path)
    if p.is_file() and p.name == LATEST_FILE:
        p = p.parent / p.read_text().strip()
    if p.is_dir() and _STEP_DIR.match(p.name):
        return p  # whether it is complete and sound: verify_checkpoint says, naming the file
    if p.is_dir():
        latest = find_latest(p)
        if latest is None:
            raise CheckpointError(f"no complete checkpoint (step-XXXXXXXX/) in {str(p)!r}")
        return latest
    raise CheckpointError(f"checkpoint {str(p)!r} not found")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check that the checkpoint directory ``path`` can be loaded, reading every file: each file
    present; ``meta.json`` a JSON object; each file's size and sha256 as ``meta.json`` recorded
    them (checkpoints written before the digests existed skip this); ``trainer_state.pt`` loads
    with ``torch.load(weights_only=True)`` and names the same step; the adapter's safetensors
    parse. Raises :class:`CheckpointError` (``reason`` set) at the first problem."""
    _read_checkpoint(Path(path))


def _read_checkpoint(ckpt: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(trainer state, meta, adapter tensors on the CPU) of a verified checkpoint."""
    from safetensors.torch import load_file

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {ckpt} is unusable: {reason}", reason=reason)

    for name in (META_FILE, STATE_FILE, ADAPTER_FILE):
        if not (ckpt / name).is_file():
            raise bad(f"{name} is missing")
    try:
        meta = json.loads((ckpt / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(f"{META_FILE} is unreadable ({one_line(e)})") from None
    if not isinstance(meta, dict):
        raise bad(f"{META_FILE} is not a JSON object")
    files = meta.get("files")
    for name, rec in (files.items() if isinstance(files, dict) else ()):
        f = ckpt / name
        try:
            size = f.stat().st_size
            if isinstance(rec, dict) and "bytes" in rec and size != rec["bytes"]:
                raise bad(f"{name} is {size} bytes, {META_FILE} recorded {rec['bytes']} (truncated or overwritten)")
            if isinstance(rec, dict) and "sha256" in rec and _sha256(f) != rec["sha256"]:
                raise bad(f"{name} does not match the sha256 that {META_FILE} recorded (corrupt)")
        except OSError as e:
            raise bad(f"{name} is unreadable ({one_line(e)})") from None
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is the checkpoint's, reported in one line
        raise bad(f"{STATE_FILE} does not load with torch.load(weights_only=True) ({one_line(e)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise bad(f"{STATE_FILE} holds no trainer state (no integer 'step')")
    m = _STEP_DIR.match(ckpt.name)
    if m and state["step"] != int(m.group(1)):
        raise bad(f"{STATE_FILE} is the state of step {state['step']}, not of step {int(m.group(1))}")
    try:
        adapter = load_file(str(ckpt / ADAPTER_FILE), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors' own error type, a truncated or garbled file
        raise bad(f"{ADAPTER_FILE} is unreadable ({one_line(e)})") from None
    return state, meta, adapter


def load_checkpoint(
    path: str | os.PathLike,
    model,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    *,
    restore_rng: bool = True,
) -> CheckpointState:
    """Restore a checkpoint into existing objects and return its :class:`CheckpointState`.

    ``path``: a ``step-*`` directory, a run directory (its newest complete checkpoint) or its
    ``latest`` file. The checkpoint is verified first (:func:`verify_checkpoint`); nothing is
    restored from one that does not verify. The adapter weights are copied into ``model``'s
    existing LoRA parameters (no new tensors, no new modules). ``optimizer`` / ``scheduler`` get
    their saved state (skipped when None). RNG states are restored unless ``restore_rng=False``.
    Leftover temp directories next to the checkpoint are removed. Raises CheckpointError for a
    missing or unusable checkpoint or one whose adapter does not fit the model (other rank or
    target modules).
    """
    from peft import set_peft_model_state_dict

    ckpt = resolve_checkpoint(path)
    cleanup_partial(ckpt.parent)
    state, meta, adapter = _read_checkpoint(ckpt)

    expected = _adapter_state_dict(model)
    # peft's saved keys drop the adapter name; compare against the model's own adapter keys
    missing = sorted(set(expected) - set(adapter))
    unexpected = sorted(set(adapter) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"adapter in {ckpt} does not match the model (rank or target modules changed?): "
            f"{len(missing)} missing keys (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    for k, v in adapter.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"adapter in {ckpt} does not match the model: {k} has shape "
                                  f"{tuple(v.shape)} in the checkpoint, {tuple(expected[k].shape)} in the model (lora_rank changed?)")
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" in n}
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"adapter in {ckpt} has keys the model lacks: {result.unexpected_keys[:3]}")
    moved = [n for n, p in model.named_parameters() if "lora_" in n and p.data_ptr() != ptrs.get(n)]
    if moved:  # pragma: no cover - peft copies in place today; guard the engine's invariant
        raise CheckpointError(f"loading the adapter replaced parameter storage ({moved[0]}); the engine needs in-place loads")

    if optimizer is not None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {ckpt} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if state.get("scheduler") is None:
            raise CheckpointError(f"checkpoint {ckpt} holds no scheduler state")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng"):
        restore_rng_state(state["rng"])
    return CheckpointState(path=ckpt, step=int(state["step"]), data_state=state.get("data"), meta=meta,
                           extra=state.get("extra") or {}, rng_states=state.get("rng"))

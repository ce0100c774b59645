"""Database entries from tune results: what a verified ``compilepass tune`` run records, and what it
must not (no verification, nothing measured against the defaults)."""

from __future__ import annotations

import os
import platform
import shlex
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from compilepass.core.errors import CompilepassError
from compilepass.core.shapes import shape_for
from compilepass.core.version import __version__
from compilepass.core.workload_spec import ENGINES, POLICIES, WorkloadSpec
from compilepass.db.keys import ModelSignature, TuneKey
from compilepass.db.store import add_entries, now_iso, user_db_path


class NotRecordable(CompilepassError):
    """A tune result that must not become an entry (no verification, nothing measured)."""


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


def _as_dict(result) -> dict:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if not isinstance(result, Mapping):
        raise NotRecordable(f"not a tune result: {type(result).__name__}")
    return dict(result)


def _judged_compile_ratio(row: Mapping) -> Optional[float]:
    """The compile-time ratio the policy judged: measured side by side in the verification process
    (results since that measurement decides), else the trial ratio older results were judged on."""
    if "compile_ratio_in_process" in row:
        return row["compile_ratio_in_process"]
    return row.get("compile_ratio")


def entry_from_tune_result(result, *, policy: Optional[str] = None, engine: Optional[str] = None,
                           note: Optional[str] = None, date: Optional[str] = None,
                           model_shape=None) -> dict:
    """A database entry from a tune result (a ``TuneResult`` or its JSON dict).

    Refuses (``NotRecordable``) results that must not be recorded: a ``--no-verify`` run, a
    verification that did not complete, a run whose defaults trial failed, the ``mlp`` test
    workload (no model to key it on). ``policy`` defaults to
    the ``--policy`` in the result's command, else "balanced". ``engine`` defaults to the engine the
    result was measured on (its workload's ``engine``, "native" for results older than that field); a
    different one is refused, since flags measured on one engine are never offered to another.
    ``engine_options`` are the native engine's options the rollout ran with (None for other workloads
    and older results).
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
    if (r.get("workload") or {}).get("kind") == "mlp":
        raise NotRecordable("not recorded: the mlp workload measures the tuner's machinery, not a model")
    policy = policy or _option_value(command, "--policy") or "balanced"
    if policy not in POLICIES:
        raise NotRecordable(f"unknown policy {policy!r}")
    env, wl = dict(r["environment"]), r["workload"]
    measured_on = wl.get("engine") or "native"
    engine = engine or measured_on
    if engine not in ENGINES:
        raise NotRecordable(f"unknown engine {engine!r}")
    if engine != measured_on:
        raise NotRecordable(f"not recorded: the result was measured on the {measured_on} engine, and an entry "
                            f"for engine {engine!r} would offer its flags to an engine they were not measured on")
    if str(wl.get("device", "auto")).startswith("cpu") and env.get("compute_capability"):
        # measured on the CPU of a GPU machine: the key is the CPU's (as select() builds it for a CPU model)
        env.update(device_name="cpu:" + (platform.processor() or platform.machine()), compute_capability=None)
    spec = WorkloadSpec.from_dict(wl)
    shape = model_shape or shape_for(spec.model)
    signature = ModelSignature.from_shape(shape, resolved_dtype_name(wl, env),
                                          quant=spec.quant())
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
                 compile_ratio=_judged_compile_ratio(row), ratio=ci["ratio"], ratio_ci_low=ci["low"],
                 ratio_ci_high=ci["high"], verify_rounds=ci.get("n", m["verify_rounds"]),
                 winner_compile_s_in_process=verdict.get("compile_s_in_process"))
        m["verified_repeats"]["winner"] = verdict.get("throughput")
    else:
        measured = [c for c in candidates if c.get("verified_ratio")]
        if measured:
            best = max(measured, key=lambda c: c["verified_ratio"]["ratio"])
            ci = best["verified_ratio"]
            m["best_candidate"] = {"flags": best["flags"], "ratio": ci["ratio"], "ratio_ci_low": ci["low"],
                                   "ratio_ci_high": ci["high"], "compile_ratio": _judged_compile_ratio(best)}

    return {
        "id": key.entry_id(),
        "key": key.to_dict(),
        "policy": policy,
        "verdict": "winner" if flags else "keep-defaults",
        "flags": flags,
        "decision": r["decision"],
        "model_name": spec.model if os.sep not in spec.model else Path(spec.model).name,
        "workload_spec": wl,
        "engine_options": r.get("engine_options"),
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



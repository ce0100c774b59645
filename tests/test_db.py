"""The tuning database: entries from tune results, fallback lookup, locked atomic writes, merge, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from cli_helpers import assert_one_line_error, run_cli

from compilepass import db
from compilepass.core.errors import CompilepassError
from compilepass.core.shapes import PRESETS
from compilepass.core.workload_spec import WorkloadSpec
from compilepass.db import (DatabaseError, ModelSignature, NotRecordable, Query, TuneKey, add_entries, bucket_dims,
                            entry_from_tune_result, load_db, lookup, merge_entries)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

H100 = {"torch": "2.11.0+cu130", "triton": "3.6.0", "vllm": None, "transformers": "5.17.0", "cuda": "13.0",
        "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "python": "3.12.3"}


def make_result(*, env: Optional[dict] = None, model: str = "qwen3-0.6b", kind: str = "rollout", batch: int = 32,
                prompt_len: int = 128, new_tokens: int = 256, winner: Optional[dict] = None,
                ratio=(1.5, 1.4, 1.6), policy: Optional[str] = None, no_verify: bool = False,
                candidates: bool = True, study: str = "study", engine: str = "native") -> dict:
    """A tune result shaped like ``TuneResult.to_dict()``: a verified winner or keep defaults (winner=None)."""
    env = dict(H100 if env is None else env)
    wl = WorkloadSpec(kind=kind, model=model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                      engine=engine).to_dict()
    command = f"compilepass tune --model {model} --workload {kind} --batch {batch}"
    if policy:
        command += f" --policy {policy}"
    cand_flags = winner if winner else {"shape_padding": False}
    r, low, high = ratio if winner else (1.005, 0.99, 1.02)
    verdict = {"flags": cand_flags, "ratio": {"ratio": r, "low": low, "high": high, "n": 6},
               "throughput": [150.0] * 6, "compile_s_in_process": 11.0, "status": "ok", "error_tail": ""}
    row = {"number": 3, "flags": cand_flags, "throughput": 150.0, "compile_s": 12.0, "compile_ratio": 1.2,
           "verified_ratio": verdict["ratio"], "verify_status": "ok", "beats_defaults": bool(winner)}
    verification = {"status": "ok", "defaults_throughput": [100.0] * 6, "defaults_compile_s_in_process": 9.0,
                    "candidates": [verdict], "order": [], "wall_s": 1.0, "error_tail": ""}
    rows = [row]
    if no_verify:
        command += " --no-verify"
        verification = None
        rows = [{k: row[k] for k in ("number", "flags", "throughput", "compile_s", "compile_ratio")}]
    if not candidates:
        verification, rows = None, []
    decision = f"winner: {r:.3f}x the defaults' throughput" if winner else "keep defaults: no candidate beats"
    return {"study_name": study, "storage": "sqlite:///x.db", "environment": env, "workload": wl, "space": [],
            "trials": [], "defaults": {"number": 0, "throughput": 100.0, "compile_s": 10.0},
            "verification": verification, "candidates": rows, "winner": winner, "decision": decision,
            "search_wall_s": 1.0, "verify_wall_s": 1.0, "command": command}


def make_entry(date: str = "2026-11-01T00:00:00Z", **kw) -> dict:
    return entry_from_tune_result(make_result(**kw), date=date)


def query(env: Optional[dict] = None, model: str = "qwen3-0.6b", dtype: str = "bfloat16", kind: str = "rollout",
          engine: str = "native", policy: str = "balanced", signature: Optional[ModelSignature] = None, **sizes):
    dims = bucket_dims(kind, **sizes)
    sig = signature or ModelSignature.from_shape(PRESETS[model], dtype)
    return Query(TuneKey.build(env or H100, sig, kind, db.bucket_string(dims) or "", engine, policy), dims)


WIN = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}


# -- entries ----------------------------------------------------------------------------------------


def test_entry_has_full_key_measurements_and_provenance():
    e = make_entry(winner=WIN)
    k = e["key"]
    assert {k_: k[k_] for k_ in ("torch", "triton", "vllm", "cuda", "device_name", "compute_capability")} == {
        k_: H100[k_] for k_ in ("torch", "triton", "vllm", "cuda", "device_name", "compute_capability")}
    assert k["model"]["family"] == "qwen3" and k["model"]["num_layers"] == 28 and k["model"]["dtype"] == "bfloat16"
    assert (k["engine"], k["workload"], k["bucket"], k["policy"]) == ("native", "rollout", "b32-p128-n256", "balanced")
    assert e["flags"] == WIN and e["verdict"] == "winner"
    m = e["measurements"]
    assert (m["ratio"], m["ratio_ci_low"], m["ratio_ci_high"], m["verify_rounds"]) == (1.5, 1.4, 1.6, 6)
    assert m["defaults_compile_s"] == 10.0 and m["winner_compile_s"] == 12.0
    assert m["verified_repeats"]["defaults"] == [100.0] * 6 and m["verified_repeats"]["winner"] == [150.0] * 6
    p = e["provenance"]
    assert p["command"].startswith("compilepass tune --model qwen3-0.6b") and p["study_name"] == "study"
    assert p["date"] and p["compilepass_version"]
    # the id is a stable hash of the key: same key, same id; another bucket, another id
    assert make_entry(winner={"max_autotune": True})["id"] == e["id"]
    assert make_entry(winner=WIN, batch=16)["id"] != e["id"]
    json.dumps(e)  # data only


def test_keep_defaults_entry_and_policy_from_command():
    e = make_entry()
    assert e["flags"] == {} and e["verdict"] == "keep-defaults" and e["measurements"]["ratio"] is None
    assert e["measurements"]["best_candidate"]["flags"] == {"shape_padding": False}
    t = make_entry(winner=WIN, policy="throughput")
    assert t["policy"] == "throughput" and t["id"] != make_entry(winner=WIN)["id"]
    # nothing faster than the defaults: no candidate, no verification, still an answer
    assert make_entry(candidates=False)["flags"] == {}


def test_not_recordable_results():
    with pytest.raises(NotRecordable, match="no-verify"):
        entry_from_tune_result(make_result(winner=WIN, no_verify=True))
    r = make_result(winner=WIN)
    r["verification"]["status"] = "timeout"
    with pytest.raises(NotRecordable, match="did not complete"):
        entry_from_tune_result(r)
    r = make_result()
    r["defaults"] = None
    with pytest.raises(NotRecordable, match="defaults trial"):
        entry_from_tune_result(r)
    with pytest.raises(NotRecordable, match="not a compilepass tune result"):
        entry_from_tune_result({"foo": 1})


def test_the_entry_is_keyed_on_the_engine_the_result_was_measured_on():
    r = make_result(winner=WIN, engine="vllm")
    assert entry_from_tune_result(r)["key"]["engine"] == "vllm"  # no engine given: the result's own
    assert entry_from_tune_result(r, engine="vllm")["key"]["engine"] == "vllm"
    with pytest.raises(NotRecordable, match="measured on the vllm engine"):
        entry_from_tune_result(r, engine="native")  # vLLM's flags offered to the native engine: refused
    del r["workload"]["engine"]  # a result older than the field: the native engine's
    assert entry_from_tune_result(r)["key"]["engine"] == "native"


def test_shipped_db_is_generated_from_the_committed_results():
    shipped = db.load_shipped()
    assert shipped["schema_version"] == db.SCHEMA_VERSION and shipped["db_version"]
    by_id = {e["id"]: e for e in shipped["entries"]}
    for name, policy in [("tune_qwen3-0.6b_rollout-engine-v3_h100_2026-11-26.json", "balanced"),
                         ("tune_qwen3-0.6b_train_h100_2026-11-26.json", "balanced"),
                         ("tune_llama-3.2-1b_rollout_h100_2026-11-26.json", "balanced"),
                         ("tune_llama-3.2-1b_train_h100_2026-11-26.json", "balanced"),
                         ("tune_tiny_rollout-engine_cpu_2026-11-26.json", "balanced"),
                         ("tune_vllm_qwen3-0.6b_h200_2026-12-04.json", "balanced")]:
        result = json.loads((RESULTS / name).read_text())
        expected = entry_from_tune_result(result)
        got = by_id[expected["id"]]
        assert got["policy"] == policy
        assert got["provenance"]["command"] == result["command"]
        assert name in got["provenance"]["note"] and "import-result" in got["provenance"]["note"]
        for field in ("key", "flags", "decision", "measurements", "verdict"):
            assert got[field] == expected[field], field
    h100 = [e for e in shipped["entries"] if e["key"]["device_name"].startswith("NVIDIA H100")]
    assert sorted((e["key"]["model"]["family"], e["key"]["workload"]) for e in h100) == [
        ("llama", "rollout"), ("llama", "train"), ("qwen3", "rollout"), ("qwen3", "train")]
    assert all(e["policy"] == "balanced" for e in h100)
    h200_vllm = [e for e in shipped["entries"] if e["key"]["device_name"] == "NVIDIA H200" and e["key"]["engine"] == "vllm"]
    assert [(e["key"]["vllm"], e["key"]["workload"], e["verdict"]) for e in h200_vllm] == [
        ("0.26.0", "rollout", "keep-defaults")]


# -- lookup: every level ----------------------------------------------------------------------------


def test_level1_exact_and_keep_defaults_counts():
    entries = [make_entry(), make_entry(winner=WIN, batch=8)]
    m = lookup(query(batch=32, prompt_len=128, new_tokens=256), entries)
    assert m.level == 1 and m.level_name == "exact" and m.entry is entries[0] and m.flags == {}
    assert "exact" in m.reason and entries[0]["id"] in m.reason and "keep defaults" in m.reason


def test_level2_nearest_bucket():
    entries = [make_entry(winner={"max_autotune": True}, batch=32), make_entry(winner=WIN, batch=64)]
    m = lookup(query(batch=48, prompt_len=128, new_tokens=256), entries)
    assert m.level == 2 and m.flags == WIN and "nearest size bucket" in m.reason
    m = lookup(query(batch=24, prompt_len=128, new_tokens=256), entries)
    assert m.level == 2 and m.flags == {"max_autotune": True}
    # unknown sizes: still the same model on the same machine
    m = lookup(query(batch=32), entries)
    assert m.level == 2 and m.flags == {"max_autotune": True}
    # far away (> 4x): not "nearby", falls to the next level (same model is within 2x parameters)
    m = lookup(query(batch=512, prompt_len=128, new_tokens=256), entries)
    assert m.level == 3


def test_level3_same_family_and_size_class():
    entries = [make_entry(winner=WIN)]
    bigger = dataclasses.replace(ModelSignature.from_shape(PRESETS["qwen3-0.6b"], "bfloat16"), num_layers=40)
    m = lookup(query(signature=bigger, batch=32, prompt_len=128, new_tokens=256), entries)
    assert m.level == 3 and m.flags == WIN and "within 2x" in m.reason
    # 8B is not within 2x of 0.6B: level 4 (same torch minor and architecture) instead
    m = lookup(query(model="qwen3-8b", batch=32, prompt_len=128, new_tokens=256), entries)
    assert m.level == 4


def test_level4_same_torch_minor_and_arch():
    entries = [make_entry(winner=WIN)]
    h200 = dict(H100, device_name="NVIDIA H200", torch="2.11.1+cu130")
    m = lookup(query(env=h200, model="llama-3.2-1b", batch=8), entries)
    assert m.level == 4 and m.flags == WIN and "2.11" in m.reason and "sm9" in m.reason
    a100 = dict(H100, compute_capability="8.0", device_name="NVIDIA A100")
    assert lookup(query(env=a100, batch=8), entries).level == 5


def test_level5_safe_defaults_and_policy_engine_separation():
    entries = [make_entry(winner=WIN, policy="throughput")]
    m = lookup(query(env=dict(H100, torch="2.12.0+cu130"), batch=32, prompt_len=128, new_tokens=256), entries)
    assert m.level == 5 and m.entry is None and m.flags == {} and "torch's own defaults" in m.reason
    # a throughput entry is not offered to a balanced caller (it says it exists)
    m = lookup(query(batch=32, prompt_len=128, new_tokens=256), entries)
    assert m.level == 5 and "'throughput'" in m.reason
    m = lookup(query(batch=32, prompt_len=128, new_tokens=256, policy="throughput"), entries)
    assert m.level == 1 and m.flags == WIN
    m = lookup(query(batch=32, prompt_len=128, new_tokens=256, policy="throughput", engine="vllm"), entries)
    assert m.level == 5
    # a different workload kind never matches
    assert lookup(query(kind="train", batch=32, policy="throughput"), entries).level == 5


def test_newer_entry_wins_a_tie():
    old = make_entry(winner={"max_autotune": True}, batch=16, date="2026-01-01T00:00:00Z")
    new = make_entry(winner=WIN, batch=64, date="2026-06-01T00:00:00Z")
    assert lookup(query(batch=32, prompt_len=128, new_tokens=256), [old, new]).flags == WIN


# -- files ------------------------------------------------------------------------------------------


def test_corrupt_and_newer_schema_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "entries": [')
    with pytest.raises(DatabaseError, match=f"{bad}.*corrupt"):
        load_db(bad)
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"schema_version": 99, "db_version": "x", "entries": []}))
    with pytest.raises(DatabaseError, match=f"{newer}.*schema_version 99, newer"):
        load_db(newer)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"entries": []}))
    with pytest.raises(DatabaseError, match="no schema_version"):
        load_db(odd)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"schema_version": 1, "entries": [{"id": "x"}]}))
    with pytest.raises(DatabaseError, match="entry 0 lacks"):
        load_db(broken)
    assert load_db(tmp_path / "missing.json")["entries"] == []
    with pytest.raises(DatabaseError, match="does not exist"):
        load_db(tmp_path / "missing.json", missing_ok=False)
    # adding to a corrupt file refuses (and leaves it as it was) instead of overwriting it
    with pytest.raises(DatabaseError, match="corrupt"):
        add_entries(bad, [make_entry()])
    assert bad.read_text() == '{"schema_version": 1, "entries": ['


def test_merge_rule_later_date_wins():
    a = make_entry(winner={"max_autotune": True}, date="2026-01-01T00:00:00Z")
    b = make_entry(winner=WIN, date="2026-02-01T00:00:00Z")
    other = make_entry(batch=8)
    merged, conflicts = merge_entries([a, other], [b])
    assert {e["id"]: e for e in merged}[a["id"]]["flags"] == WIN
    assert conflicts == [{"id": a["id"], "kept_date": b["provenance"]["date"],
                          "dropped_date": a["provenance"]["date"], "kept": "incoming"}]
    merged, conflicts = merge_entries([b], [a])
    assert merged == [b] and conflicts[0]["kept"] == "existing"
    merged, conflicts = merge_entries([a], [dict(a)])
    assert merged == [a] and conflicts == []


_CHILD = r"""
import json, sys, time
from pathlib import Path
import compilepass.core.atomic as atomic
from compilepass.db import add_entries
path, marker, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
entries = json.loads(Path(sys.argv[4]).read_text())
if mode == "slow-serialize":
    real = atomic.json.dumps
    def slow(*a, **k):
        marker.write_text("serializing")
        time.sleep(60)
        return real(*a, **k)
    atomic.json.dumps = slow
else:  # the new bytes are in the temp file, not yet renamed over the database
    real_fsync = atomic.os.fsync
    def slow_fsync(fd):
        real_fsync(fd)
        marker.write_text("written")
        time.sleep(60)
    atomic.os.fsync = slow_fsync
add_entries(path, entries)
"""


@pytest.mark.parametrize("mode", ["slow-serialize", "slow-fsync"])
def test_writer_killed_mid_write_leaves_previous_file(tmp_path, mode):
    path = tmp_path / "tuning_db.json"
    first = make_entry()
    add_entries(path, [first])
    before = path.read_text()
    new = tmp_path / "new.json"
    new.write_text(json.dumps([make_entry(winner=WIN, batch=8)]))
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(marker), mode, str(new)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "writer exited early"
            assert time.monotonic() < deadline, "writer never reached the slow step"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert path.read_text() == before
    assert [e["id"] for e in load_db(path)["entries"]] == [first["id"]]
    # the lock died with the writer: the next write goes through
    add_entries(path, [make_entry(winner=WIN, batch=8)])
    assert len(load_db(path)["entries"]) == 2


_ADDER = r"""
import json, sys
from pathlib import Path
from compilepass.db import add_entries
for entry in json.loads(Path(sys.argv[2]).read_text()):
    add_entries(sys.argv[1], [entry])
"""


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "tuning_db.json"
    procs, ids = [], set()
    for w in range(3):
        entries = [make_entry(batch=8 * (w * 10 + i + 1)) for i in range(6)]
        ids |= {e["id"] for e in entries}
        f = tmp_path / f"w{w}.json"
        f.write_text(json.dumps(entries))
        procs.append(subprocess.Popen([sys.executable, "-c", _ADDER, str(path), str(f)]))
    for p in procs:
        assert p.wait(120) == 0
    assert {e["id"] for e in load_db(path)["entries"]} == ids


def test_record_tune_result_into_user_db(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(tmp_path))
    entry = db.record_tune_result(make_result(winner=WIN))
    stored = load_db(tmp_path / "tuning_db.json")["entries"]
    assert [e["id"] for e in stored] == [entry["id"]]
    rows = db.merged_view()
    assert (entry["id"], f"user ({tmp_path / 'tuning_db.json'})") in [(e["id"], s) for e, s in rows]
    with pytest.raises(NotRecordable):
        db.record_tune_result(make_result(winner=WIN, no_verify=True))


def test_user_entry_overrides_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(tmp_path))
    shipped = db.load_shipped()["entries"][0]
    mine = dict(shipped, flags={"max_autotune": True},
                provenance=dict(shipped["provenance"], date="2030-01-01T00:00:00Z"))
    add_entries(tmp_path / "tuning_db.json", [mine])
    rows = {e["id"]: (e, s) for e, s in db.merged_view()}
    assert rows[shipped["id"]][0]["flags"] == {"max_autotune": True}
    assert rows[shipped["id"]][1].startswith("user")


def test_remove_entry(tmp_path):
    path = tmp_path / "db.json"
    a, b = make_entry(batch=8), make_entry(batch=16)
    add_entries(path, [a, b])
    removed = db.remove_entry(path, a["id"][:8])
    assert removed == a
    assert [e["id"] for e in db.load_db(path)["entries"]] == [b["id"]]
    with pytest.raises(db.DatabaseError, match="no entry with id"):
        db.remove_entry(path, a["id"])
    with pytest.raises(db.DatabaseError, match="does not exist"):
        db.remove_entry(tmp_path / "missing.json", b["id"])
    proc = run_cli("db", "remove", b["id"], "--file", str(path))
    assert proc.returncode == 0 and "removed" in proc.stdout
    assert db.load_db(path)["entries"] == []


# -- CLI --------------------------------------------------------------------------------------------


def test_cli_db_user_errors(tmp_path):
    env = {"COMPILEPASS_CACHE_DIR": str(tmp_path)}
    assert_one_line_error(run_cli("db", "show", "ffffffff", env=env), "no entry with id 'ffffffff'")
    assert_one_line_error(run_cli("db", "import-result", str(tmp_path / "nope.json"), env=env), "nope.json",
                          "does not exist")
    nv = tmp_path / "noverify.json"
    nv.write_text(json.dumps(make_result(winner=WIN, no_verify=True)))
    assert_one_line_error(run_cli("db", "import-result", str(nv), env=env), "no-verify")
    assert_one_line_error(run_cli("db", "merge", str(tmp_path / "missing.json"), "--into",
                                  str(tmp_path / "dst.json"), env=env), "missing.json", "does not exist")
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"schema_version": 2, "db_version": "x", "entries": []}))
    assert_one_line_error(run_cli("db", "verify", str(newer), env=env), str(newer), "newer")
    (tmp_path / "tuning_db.json").write_text("{not json")
    assert_one_line_error(run_cli("db", "list", env=env), str(tmp_path / "tuning_db.json"), "corrupt")


def test_cli_db_roundtrip(tmp_path):
    env = {"COMPILEPASS_CACHE_DIR": str(tmp_path)}
    res = tmp_path / "result.json"
    res.write_text(json.dumps(make_result(winner={"epilogue_fusion": False}, model="tiny", batch=4)))
    proc = run_cli("db", "import-result", str(res), env=env)
    assert proc.returncode == 0, proc.stderr
    entry = load_db(tmp_path / "tuning_db.json")["entries"][0]
    assert entry["provenance"]["command"].startswith("compilepass tune --model tiny")
    assert "import-result" in entry["provenance"]["note"]
    proc = run_cli("db", "list", env=env)
    assert proc.returncode == 0 and entry["id"] in proc.stdout and "shipped" in proc.stdout
    proc = run_cli("db", "show", entry["id"][:6], env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout) == entry
    out = tmp_path / "export.json"
    assert run_cli("db", "export", str(out), env=env).returncode == 0
    exported = load_db(out, missing_ok=False)["entries"]
    assert {e["id"] for e in exported} == {entry["id"]} | {e["id"] for e in db.load_shipped()["entries"]}
    # merge with a conflict: the later date wins and the conflict is reported
    newer = dict(entry, flags={"epilogue_fusion": False, "max_autotune": True},
                 provenance=dict(entry["provenance"], date="2031-01-01T00:00:00Z"))
    src = tmp_path / "src.json"
    src.write_text(json.dumps({"schema_version": 1, "db_version": "t", "entries": [newer]}))
    proc = run_cli("db", "merge", str(src), "--into", str(out), env=env)
    assert proc.returncode == 0 and "conflict on " + entry["id"] in proc.stdout
    assert {e["id"]: e for e in load_db(out)["entries"]}[entry["id"]]["flags"]["max_autotune"] is True


def test_cli_db_verify(tmp_path):
    env = {"COMPILEPASS_CACHE_DIR": str(tmp_path)}
    proc = run_cli("db", "verify", env=env)  # shipped + (empty) user
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cpu = dict(H100, device_name="cpu:x86_64", compute_capability=None, cuda=None, torch="2.13.0+cpu")
    bad = [make_entry(winner={"not_an_inductor_option": True}, batch=2),
           make_entry(winner={"combo_kernels": True}, env=cpu, model="tiny", batch=4),
           make_entry(winner={"max_autotune": "yes"}, batch=8)]
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"schema_version": 1, "db_version": "t", "entries": bad}))
    proc = run_cli("db", "verify", str(f), env=env)
    assert proc.returncode == 1
    out = proc.stdout
    assert f"entry {bad[0]['id']}" in out and "not_an_inductor_option" in out
    assert f"entry {bad[1]['id']}" in out and "gated unsafe" in out and "combo_kernels" in out
    assert f"entry {bad[2]['id']}" in out and "takes a bool" in out


def test_cli_info_model(tmp_path):
    env = {"COMPILEPASS_CACHE_DIR": str(tmp_path)}
    proc = run_cli("info", "--json", "--model", "qwen3-0.6b", "--batch", "32", env=env)
    assert proc.returncode == 0, proc.stderr
    sel = json.loads(proc.stdout)["selection"]
    assert sel["match_level"] in (1, 2, 3, 4, 5) and sel["reason"].startswith(sel["level_name"])
    assert_one_line_error(run_cli("info", "--model", "qwen9-1t", env=env), "qwen9-1t")


def test_cmd_tune_records_into_user_db(tmp_path, monkeypatch):
    """cmd_tune's recording step, given a TuneResult (the search itself is tested elsewhere)."""
    import argparse
    import io

    from rich.console import Console

    from compilepass.cli.tune import _record
    from compilepass.tuning.search import TuneResult

    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(tmp_path))
    out = io.StringIO()
    console = Console(file=out, width=200)
    args = argparse.Namespace(no_verify=False, policy="throughput")
    result = TuneResult(**make_result(winner=WIN))
    _record(result, args, console)
    stored = load_db(tmp_path / "tuning_db.json")["entries"]
    assert len(stored) == 1 and stored[0]["policy"] == "throughput" and stored[0]["flags"] == WIN
    assert f"recorded as entry {stored[0]['id']}" in out.getvalue()
    # --no-verify: never recorded
    _record(TuneResult(**make_result(winner=WIN, no_verify=True)), argparse.Namespace(no_verify=True,
                                                                                       policy="balanced"), console)
    assert len(load_db(tmp_path / "tuning_db.json")["entries"]) == 1 and "not recorded" in out.getvalue()
    # a corrupt user database: one clear error, and the result is kept in the cache dir
    (tmp_path / "tuning_db.json").write_text("{")
    with pytest.raises(CompilepassError, match="corrupt.*saved in"):
        _record(TuneResult(**make_result(winner=WIN, study="s2")), args, console)
    assert json.loads((tmp_path / "tune-result-s2.json").read_text())["winner"] == WIN


# -- quantization (QLoRA's 4-bit bases) ---------------------------------------------------------------


def _as_4bit(entry: dict) -> dict:
    """The same measurement keyed for a 4-bit NF4 base (what a 4-bit tune would record)."""
    key = TuneKey.from_dict(entry["key"])
    key = dataclasses.replace(key, model=dataclasses.replace(key.model, quant="nf4-dq"))
    return dict(entry, key=key.to_dict(), id=key.entry_id())


def test_a_4bit_entry_never_applies_to_a_16bit_model_nor_back():
    e16 = make_entry(winner=WIN)
    e4 = _as_4bit(make_entry(winner={"max_autotune": True}))
    # 16-bit keys are stored as before the field existed (same ids); 4-bit ones name it
    assert "quant" not in e16["key"]["model"] and e4["key"]["model"]["quant"] == "nf4-dq" and e4["id"] != e16["id"]
    assert TuneKey.from_dict(e16["key"]).entry_id() == e16["id"] and TuneKey.from_dict(e4["key"]).entry_id() == e4["id"]
    assert TuneKey.from_dict(e16["key"]).model.quant is None
    sig16 = ModelSignature.from_shape(PRESETS["qwen3-0.6b"], "bfloat16")
    sig4 = dataclasses.replace(sig16, quant="nf4-dq")
    sizes = dict(batch=32, prompt_len=128, new_tokens=256)
    both = [e16, e4]
    m = lookup(query(signature=sig4, **sizes), both)
    assert m.level == 1 and m.entry is e4 and m.flags == {"max_autotune": True}
    m = lookup(query(signature=sig16, **sizes), both)
    assert m.level == 1 and m.entry is e16 and m.flags == WIN
    # with only the other quantization's entry, no level offers it: not nearby, similar or same-arch
    for sig, entries in ((sig4, [e16]), (sig16, [e4])):
        for q in (query(signature=sig, **sizes), query(signature=sig, batch=48, prompt_len=128, new_tokens=256),
                  query(signature=dataclasses.replace(sig, num_layers=40), **sizes),
                  query(env=dict(H100, device_name="NVIDIA H200"), signature=sig, batch=8)):
            m = lookup(q, entries)
            assert m.level == 5 and m.flags == {}, (sig.quant, m.reason)
    assert "16-bit entries are not applied" in lookup(query(signature=sig4, **sizes), [e16]).reason
    # within one quantization the fallback levels work as for 16-bit models
    assert lookup(query(signature=dataclasses.replace(sig4, num_layers=40), **sizes), [e4]).level == 3
    assert lookup(query(env=dict(H100, device_name="NVIDIA H200"), signature=sig4, batch=8), [e4]).level == 4


def test_select_keys_a_4bit_model_by_its_quantization():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'compilepass[qlora]')")
    from quant_helpers import quantized_tiny

    from compilepass.selection import model_signature

    model = quantized_tiny("tiny", lora=True)
    sig = model_signature(model)
    assert sig.quant == "nf4-dq" and sig.dtype == "float32" and sig.family == "qwen3"
    assert model_signature("tiny").quant is None  # a name is a 16-bit model

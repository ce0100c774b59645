"""Faults and bad input on the tuner side, with real processes, signals, Optuna storages and compiles.

A trial is made to hang, fail or compile for real through Inductor's own compiler setting: ``CXX``
(Inductor's default C++ compiler) points at a small script that runs g++, fails, or records its
pid and sleeps. Every process a test starts carries a marker in its environment, inherited by
every descendant (trial child, guard, compiler), so "no process of the run survives" is checked
over /proc, whatever the process was reparented to.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import pytest

from compilepass.cli.app import build_parser, main
from compilepass.core.atomic import stale_temp_files, sweep_stale_temp_files
from compilepass.core.errors import ConfigError
from compilepass.core.procs import HOST, owner_alive, owner_tag, pid_alive
from compilepass.core.workload_spec import WorkloadSpec
from compilepass.db import entry_from_tune_result, load_db
from compilepass.tuning.isolation import CHILD_PID_FILE, RUN_PREFIX, stale_run_dirs
from compilepass.tuning.search import (TuneConfig, Tuner, decide, encode_choice, measured_trials, param_choices,
                                       select_candidates, trial_rows)
from compilepass.tuning.stats import paired_ratio_ci
from compilepass.tuning.verify import CandidateVerdict, VerifyResult

MLP_ARGS = ["--workload", "mlp", "--model", "-", "--device", "cpu", "--repeats", "2"]
# the smallest recordable workload (mlp results are never recorded: no model to key them on)
TINY_ARGS = ["--workload", "rollout", "--model", "tiny", "--device", "cpu", "--batch", "1", "--prompt-len", "4",
             "--new-tokens", "2", "--repeats", "1"]

FAULT_CXX = r"""#!/bin/sh
# Inductor's C++ compiler for these tests ($CXX): FAULT_CXX_MODE picks what a compile does.
case "$FAULT_CXX_MODE" in
  fail) exit 1 ;;
  real) exec g++ "$@" ;;
  first-real)  # the first trial (the first cache dir seen) compiles for real, later ones hang
    first="$FAULT_DIR/first-cache-dir"
    [ -s "$first" ] || echo "$TORCHINDUCTOR_CACHE_DIR" > "$first"
    [ "$(cat "$first")" = "$TORCHINDUCTOR_CACHE_DIR" ] && exec g++ "$@" ;;
esac
echo $$ >> "$FAULT_DIR/hang.pids"
exec sleep 600
"""


class Run:
    """One test's world: cache dir, temp dir, study storage, the fault compiler, the process marker."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "cache"
        self.tmp = root / "tmp"
        self.tmp.mkdir()
        self.db = root / "study.db"
        self.storage = f"sqlite:///{self.db}"
        self.cxx = root / "cxx"
        self.cxx.write_text(FAULT_CXX)
        self.cxx.chmod(0o755)
        self.marker = uuid.uuid4().hex
        self.hang_pids = root / "hang.pids"

    def env(self, mode: str) -> dict:
        return dict(os.environ, COMPILEPASS_CACHE_DIR=str(self.cache), TMPDIR=str(self.tmp), CXX=str(self.cxx),
                    FAULT_CXX_MODE=mode, FAULT_DIR=str(self.root), FAULT_RUN=self.marker)

    def tune(self, *args) -> list:
        return [sys.executable, "-m", "compilepass.cli", "tune", *MLP_ARGS, "--storage", self.storage,
                "--study-name", "s", *args]

    def start(self, mode: str, *args) -> subprocess.Popen:
        return subprocess.Popen(self.tune(*args), env=self.env(mode), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, mode: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.tune(*args), env=self.env(mode), capture_output=True, text=True, timeout=timeout)

    def processes(self) -> list[int]:
        """Live (not zombie) processes that carry this run's marker."""
        needle = f"FAULT_RUN={self.marker}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle not in f.read().split(b"\0"):
                        continue
            except OSError:
                continue
            if pid_alive(int(entry)):
                found.append(int(entry))
        return found

    def wait_gone(self, within_s: float) -> list[int]:
        deadline = time.monotonic() + within_s
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def wait_hang(self, proc: subprocess.Popen, within_s: float = 240) -> None:
        deadline = time.monotonic() + within_s
        while not (self.hang_pids.exists() and self.hang_pids.read_text().strip()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the compile never reached the hanging compiler"
            time.sleep(0.2)

    def run_dirs(self) -> list[Path]:
        return sorted(p for p in self.tmp.iterdir() if p.name.startswith(RUN_PREFIX))

    def study(self):
        return optuna.load_study(study_name="s", storage=self.storage)

    def cleanup(self) -> None:
        for pid in self.processes():  # only processes this test started (they carry its marker)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def run(tmp_path):
    r = Run(tmp_path)
    yield r
    r.cleanup()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def finished(study) -> list:
    return [(t.number, tuple(t.values), t.user_attrs.get("status")) for t in measured_trials(study)]


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# -- kill -9, SIGTERM, Ctrl-C of `compilepass tune` -------------------------------------------------


@pytest.mark.slow
def test_kill9_while_a_trial_runs_leaves_nothing_and_the_study_resumes(run):
    proc = run.start("first-real", "--trials", "3", "--no-verify")
    run.wait_hang(proc)  # trial 0 compiled and measured for real; trial 1 hangs in its compiler
    assert len(run.processes()) >= 4  # tune, the trial, its guard, the compiler
    before = finished(run.study())
    assert [s for _, _, s in before] == ["ok"]
    [run_dir] = run.run_dirs()
    assert run_dir.name.startswith(f"{RUN_PREFIX}{proc.pid}@{HOST}-")
    # leftovers of other writers beside the user database: a dead one's and a live one's (ours)
    run.cache.mkdir(exist_ok=True)
    stale_tmp = run.cache / f".tuning_db.json.{dead_pid()}@{HOST}.abcd1234.tmp"
    live_tmp = run.cache / f".tuning_db.json.{owner_tag()}.efgh5678.tmp"
    live_dir = run.tmp / f"{RUN_PREFIX}{owner_tag()}-ijkl9012"
    for path in (stale_tmp, live_tmp):
        path.write_text("{")
    live_dir.mkdir()

    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert run.wait_gone(5) == [], "a process of the killed tune survived"
    gone_s = time.monotonic() - t0
    assert run_dir.exists()  # its owner died before removing it

    resumed = run.run("fail", "--trials", "2", "--no-verify")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not run_dir.exists() and not stale_tmp.exists()  # swept at the start
    assert live_tmp.exists() and live_dir.exists()  # a live process's files are never touched
    study = run.study()
    after = finished(study)
    assert all(item in after for item in before) and len(after) == 2
    killed = study.trials[1]
    assert killed.state == optuna.trial.TrialState.FAIL
    assert killed.user_attrs["abandoned"] == f"its tuner (pid {proc.pid}) died"
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == 1)
    assert retry.params == killed.params and retry.user_attrs["status"] == "failed"
    assert run.processes() == [] and run.run_dirs() == [live_dir]
    print(f"no process left {gone_s:.2f} s after kill -9")


@pytest.mark.slow
def test_kill9_during_verification_then_the_rerun_verifies_and_records(run, monkeypatch):
    args = TINY_ARGS + ["--flags", "size_asserts", "--trials", "2", "--verify-rounds", "3"]
    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(run.cache))
    monkeypatch.setattr(tempfile, "tempdir", str(run.tmp))
    from compilepass.cli.tune import _config_from_args

    config = _config_from_args(build_parser().parse_args(["tune", *args, "--storage", run.storage,
                                                           "--study-name", "s"]))
    tuner = Tuner(config)  # the study the CLI opens, with two measured trials: defaults and a faster one
    spec = tuner.space.spec("size_asserts")
    dist = {"size_asserts": optuna.distributions.CategoricalDistribution(param_choices(spec))}
    for value, throughput in ((True, 1000.0), (False, 2000.0)):
        flags = tuner.space.effective({"size_asserts": value})
        tuner.study.add_trial(optuna.trial.create_trial(
            params={"size_asserts": encode_choice(value)}, distributions=dist, values=[throughput, 10.0],
            constraints={"failed": 0.0}, user_attrs={"flags": flags, "measured": True, "feasible": True, "status": "ok",
                                           "compile_s": 10.0, "throughput": throughput}))

    proc = subprocess.Popen([sys.executable, "-m", "compilepass.cli", "tune", *args, "--storage", run.storage,
                             "--study-name", "s"], env=run.env("hang"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run.wait_hang(proc)
    cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in run.processes()]
    assert any(b"compilepass.tuning.verify" in c for c in cmdlines)  # hanging in verification, not a trial
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert run.wait_gone(5) == []
    assert not (run.cache / "tuning_db.json").exists()

    rerun = subprocess.run([sys.executable, "-m", "compilepass.cli", "tune", *args, "--storage", run.storage,
                            "--study-name", "s"], env=run.env("real"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    [entry] = load_db(run.cache / "tuning_db.json")["entries"]
    assert entry["provenance"]["study_name"] == "s"
    m = entry["measurements"]
    assert m["verify_rounds"] == 3 and m["defaults_compile_s_in_process"] > 0
    assert len(m["verified_repeats"]["defaults"]) == 3
    assert entry["engine_options"]["compile_scope"]  # item 7, through the verification process
    assert len(finished(run.study())) == 2  # no trial was measured again
    assert run.run_dirs() == [] and run.processes() == []


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_abandons_the_running_trial_and_the_study_resumes(run, sig, code):
    proc = run.start("hang", "--trials", "1", "--no-verify")
    run.wait_hang(proc)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)  # seconds normally; a loaded 2-core machine took over 30 once
    assert proc.returncode == code
    name = signal.Signals(sig).name
    line = one_line(stderr)
    assert line.startswith(f"compilepass: {name}: the running trial was abandoned") and "resume" in line
    assert run.processes() == []  # killed with its group before tune exited
    assert run.run_dirs() == []
    [trial] = run.study().trials
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["abandoned"] == f"interrupted by {name}"
    if sig == signal.SIGINT:
        return  # resuming after SIGTERM shows the same path
    resumed = run.run("fail", "--trials", "1", "--no-verify")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    retry = next(t for t in run.study().trials if t.user_attrs.get("retry_of") == 0)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == trial.params


_PARENT = r"""
import sys
from compilepass.core.workload_spec import WorkloadSpec
from compilepass.tuning.trial import TrialSpec, run_trial
run_trial(TrialSpec(WorkloadSpec(kind="mlp", model="-", device="cpu"), {}, repeats=1, timeout_s=300),
          lifeline=sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("lifeline", ["prctl", "watchdog"])
def test_trial_dies_with_its_parent(run, lifeline):
    """Both lifelines, prctl's death signal and the watchdog thread kept for systems without it."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, lifeline], env=run.env("hang"))
    run.wait_hang(parent)
    cmdlines = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in run.processes()}
    assert sum(f"isolation\0{lifeline}\0".encode() in c for c in cmdlines.values()) == (
        2 if lifeline == "prctl" else 1)  # the trial (and in prctl mode its guard)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert run.wait_gone(5) == []
    # A process that is exiting shows an empty /proc/<pid>/environ, so wait_gone can pass while the trial
    # is still tearing down (not yet a zombie): the run directory turns stale a moment later.
    deadline = time.monotonic() + 10
    while not (left := stale_run_dirs(str(run.tmp))) and time.monotonic() < deadline:
        time.sleep(0.1)
    dirs = {p.name: sorted(c.name for c in p.iterdir()) for p in run.tmp.iterdir() if p.is_dir()}
    assert len(left) == 1, (dirs, [(p.name, (p / CHILD_PID_FILE).read_text() if (p / CHILD_PID_FILE).exists()
                                     else None) for p in run.tmp.iterdir() if p.is_dir()])
    assert left[0].name.startswith(f"{RUN_PREFIX}{parent.pid}@")


# -- kill -9 during a database write ---------------------------------------------------------------


_WRITER = r"""
import json, sys
from compilepass.db import add_entries
path, template = sys.argv[1], json.loads(sys.argv[2])
n = 0
while True:
    add_entries(path, [dict(template, id=f"w{n:06d}", note="x" * 20000)])
    n += 1
"""

_STUCK_WRITER = r"""
import sys, time
from pathlib import Path
import compilepass.core.atomic as atomic
def stuck(fd):
    Path(sys.argv[2]).write_text("written")
    time.sleep(120)
atomic.os.fsync = stuck
atomic.write_bytes_atomic(sys.argv[1], b"{}")
"""


def test_kill9_during_db_writes_leaves_old_or_new_file_and_sweeps_dead_temps(tmp_path):
    path = tmp_path / "tuning_db.json"
    template = entry_from_tune_result(json.loads((Path(__file__).parent.parent / "benchmarks" / "results" /
                                                  "tune_tiny_rollout-engine_cpu_2026-11-26.json").read_text()))
    seen, torn, attempt = 0, 0, 0
    while torn == 0 or attempt < 4:  # until a kill has landed mid-write (a temp file left behind)
        attempt += 1
        assert attempt <= 20, "no kill landed mid-write"
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), json.dumps(template)])
        try:
            deadline = time.monotonic() + 60
            while not path.exists() or len(load_db(path)["entries"]) <= seen:
                assert writer.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            if attempt % 2:  # a kill at a random moment: between writes or inside one
                time.sleep(random.uniform(0.0, 0.2))
            else:  # a kill inside a write: as soon as the writer's temp file is there
                in_flight = f".{path.name}.{writer.pid}@*"
                until = time.monotonic() + 10
                while not any(tmp_path.glob(in_flight)) and time.monotonic() < until:
                    pass
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait()
        entries = load_db(path)["entries"]  # parses: the old file or the new one, never a torn one
        ids = [e["id"] for e in entries]
        assert len(ids) >= seen and ids == sorted(ids) and len(set(ids)) == len(ids)
        assert all(e["note"] == "x" * 20000 for e in entries)
        seen = len(ids)
        torn += len(stale_temp_files(tmp_path))

    marker = tmp_path / "marker"
    stuck = subprocess.Popen([sys.executable, "-c", _STUCK_WRITER, str(tmp_path / "other.json"), str(marker)])
    try:
        while not marker.exists():
            assert stuck.poll() is None
            time.sleep(0.02)
        live = [p for p in tmp_path.iterdir() if p.name.startswith(f".other.json.{stuck.pid}@")]
        assert len(live) == 1
        removed = sweep_stale_temp_files(tmp_path)  # what `compilepass tune` runs on its cache dir at start
        assert removed and all(".tuning_db.json." in p.name for p in removed)
        assert stale_temp_files(tmp_path) == [] and live[0].exists()  # the live writer's temp file stays
    finally:
        stuck.kill()
        stuck.wait()
    assert sweep_stale_temp_files(tmp_path) == live  # its writer is gone now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker", "tuning_db.json", "tuning_db.json.lock"]


def test_owner_tags_and_liveness():
    assert owner_alive(owner_tag()) and pid_alive(os.getpid())
    pid = dead_pid()
    assert not pid_alive(pid) and not owner_alive(f"{pid}@{HOST}")
    assert owner_alive(f"{pid}@another_host") and owner_alive("not-a-tag")  # not ours to judge
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not pid_alive(zombie.pid)  # exited, not reaped yet
    zombie.wait()


# -- item 2: counts and sizes -----------------------------------------------------------------------


BAD_NUMBERS = [("--batch", "0"), ("--batch", "-1"), ("--prompt-len", "0"), ("--new-tokens", "0"),
               ("--seq-len", "0"), ("--lora-rank", "0"), ("--trials", "0"), ("--trials", "-2"), ("--repeats", "0"),
               ("--verify-rounds", "2"), ("--verify-candidates", "0"), ("--trial-timeout", "0"),
               ("--trial-timeout", "-5"), ("--trial-timeout", "nan"), ("--time-budget", "0"),
               ("--time-budget", "inf"), ("--max-compile-ratio", "0"), ("--max-compile-ratio", "-1")]


@pytest.mark.parametrize("option, value", BAD_NUMBERS)
def test_bad_counts_and_sizes_are_one_line_and_record_nothing(tmp_path, monkeypatch, capsys, option, value):
    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(tmp_path / "cache"))
    storage = tmp_path / "s.db"
    code = main(["tune", *MLP_ARGS, "--storage", f"sqlite:///{storage}", option, value])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"compilepass: error: {option} must be") and value in line
    assert not storage.exists() and not (tmp_path / "cache" / "tuning_db.json").exists()


def test_bad_batch_through_the_real_command(tmp_path):
    storage = tmp_path / "s.db"
    proc = subprocess.run([sys.executable, "-m", "compilepass.cli", "tune", *MLP_ARGS, "--batch", "0",
                           "--storage", f"sqlite:///{storage}"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COMPILEPASS_CACHE_DIR=str(tmp_path / "cache")))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert one_line(proc.stderr) == "compilepass: error: --batch must be >= 1, got 0"
    assert not storage.exists() and not (tmp_path / "cache" / "tuning_db.json").exists()


def test_python_api_rejects_the_same_values():
    mlp = WorkloadSpec(kind="mlp", model="-", device="cpu")
    for field, value in [("batch", 0), ("prompt_len", -1), ("new_tokens", 0), ("seq_len", 0), ("lora_rank", 0),
                         ("batch", 2.5), ("batch", None), ("batch", True)]:
        with pytest.raises(ConfigError, match="--" + field.replace("_", "-")):
            WorkloadSpec(kind="mlp", model="-", **{field: value}).validate()
    for field, value, option in [("trials", 0, "--trials"), ("repeats", 0, "--repeats"),
                                 ("verify_rounds", 2, "--verify-rounds"),
                                 ("verify_candidates", 0, "--verify-candidates"),
                                 ("trial_timeout_s", 0.0, "--trial-timeout"),
                                 ("trial_timeout_s", float("nan"), "--trial-timeout"),
                                 ("time_budget_s", 0, "--time-budget"),
                                 ("max_compile_ratio", 0.0, "--max-compile-ratio"), ("heartbeat_s", 0, "heartbeat_s"),
                                 ("min_gain", -0.1, "min_gain"), ("trials", 1.5, "--trials")]:
        with pytest.raises(ConfigError, match=option):
            TuneConfig(workload=mlp, **{field: value}).validate()
        with pytest.raises(ConfigError, match=option):
            Tuner(TuneConfig(workload=mlp, storage="sqlite:////nonexistent-dir/x.db", **{field: value}))
    TuneConfig(workload=mlp, time_budget_s=None).validate()


def test_info_rejects_zero_sizes(capsys):
    assert main(["info", "--model", "tiny", "--batch", "0"]) == 2
    assert one_line(capsys.readouterr().err) == "compilepass: error: --batch must be >= 1, got 0"


# -- item 3: the user database and the storage are checked before the first trial ------------------


def test_corrupt_or_unwritable_user_db_fails_before_any_trial(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(cache))
    storage = tmp_path / "s.db"
    argv = ["tune", *TINY_ARGS, "--storage", f"sqlite:///{storage}", "--study-name", "s"]
    db = cache / "tuning_db.json"
    db.write_text('{"schema_version": 1, "entries": [')
    t0 = time.monotonic()
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert str(db) in line and "corrupt" in line
    assert time.monotonic() - t0 < 30 and not storage.exists()  # before the study, before any trial
    db.unlink()
    (cache / "tuning_db.json.lock").mkdir()  # the lock cannot be taken: the database cannot be written
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert "cannot lock tuning database" in line and str(db) in line and not storage.exists()
    # --out in a place that cannot be written
    (cache / "tuning_db.json.lock").rmdir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(argv + ["--out", str(blocker / "result.json")]) == 2
    assert "cannot write --out" in one_line(capsys.readouterr().err) and not storage.exists()


# -- item 6: unverified trial ratios; the compile limit judged in the verification process ---------


def _verification(candidates, base, compile_s, defaults_compile_s=10.0):
    verdicts = []
    for (flags, samples), cs in zip(candidates, compile_s):
        verdicts.append(CandidateVerdict(flags, paired_ratio_ci(samples, base).to_dict(), samples, cs).__dict__)
    return VerifyResult("ok", base, defaults_compile_s, verdicts)


BASE = [1000.0, 1010.0, 990.0, 1005.0, 995.0, 1000.0]


def test_balanced_limit_is_judged_on_in_process_compile_times():
    fast = [b * 1.3 for b in BASE]
    faster = [b * 1.5 for b in BASE]
    picks = [{"flags": {"a": True}, "throughput": 2, "compile_s": 1, "unverified_compile_ratio": 1.0},
             {"flags": {"b": True}, "throughput": 2, "compile_s": 1, "unverified_compile_ratio": 1.0}]
    # in its trial "b" compiled as fast as the defaults; side by side it takes 1.5x
    verification = _verification([({"a": True}, fast), ({"b": True}, faster)], BASE, [11.0, 15.0])
    winner, decision, rows = decide(picks, verification, 0.01, max_compile_ratio=1.2)
    assert winner == {"a": True}
    assert "compile 1.10x the defaults' in the same process" in decision
    assert "a faster candidate (1.500x) compiles 1.50x the defaults' in the verification process, above " \
           "--max-compile-ratio 1.2" in decision
    assert [r["compile_ratio_in_process"] for r in rows] == pytest.approx([1.1, 1.5])
    assert [r["within_compile_limit"] for r in rows] == [True, False]
    # only the slow-compiling one beats the defaults: keep defaults, and the text says why
    winner, decision, _ = decide(picks[1:], _verification([({"b": True}, faster)], BASE, [15.0]), 0.01, 1.2)
    assert winner is None and decision.startswith("keep defaults: the fastest candidate that beats")
    assert "compiles 1.50x the defaults' in the verification process" in decision
    # the throughput policy has no compile limit
    winner, _, _ = decide(picks[1:], _verification([({"b": True}, faster)], BASE, [15.0]), 0.01, None)
    assert winner == {"b": True}


def test_balanced_selection_does_not_drop_candidates_on_unverified_compile_times():
    config = TuneConfig(workload=WorkloadSpec(kind="mlp", model="-"), verify_candidates=2)
    defaults = {"number": 0, "throughput": 100.0, "compile_s": 10.0}
    front = [{"number": 1, "flags": {"a": True}, "throughput": 300.0, "compile_s": 55.0},  # 5.5x in its trial
             {"number": 2, "flags": {"b": True}, "throughput": 200.0, "compile_s": 11.0},
             {"number": 3, "flags": {"c": True}, "throughput": 150.0, "compile_s": 9.0}]
    picks, _ = select_candidates(front, defaults, config)
    assert [p["number"] for p in picks] == [2, 3]  # within the limit in their trials: verified first
    picks, _ = select_candidates(front, defaults, TuneConfig(workload=config.workload, verify_candidates=3))
    assert [p["number"] for p in picks] == [2, 3, 1]  # not dropped: verification judges it
    assert picks[2]["unverified_trial_ratio"] == 3.0 and picks[2]["unverified_compile_ratio"] == 5.5


def test_trial_ratios_are_marked_unverified_in_json_and_table(capsys):
    study = optuna.create_study(directions=["maximize", "minimize"])
    for number, (flags, tp) in enumerate([({}, 1000.0), ({"a": True}, 5520.0)]):
        study.add_trial(optuna.trial.create_trial(values=[tp, 10.0], user_attrs={
            "flags": flags, "measured": True, "feasible": True, "status": "ok", "compile_s": 10.0,
            "throughput": tp}))
    defaults = {"number": 0, "throughput": 1000.0, "compile_s": 10.0}
    rows = trial_rows(study, defaults)
    assert [r["unverified_trial_ratio"] for r in rows] == [1.0, 5.52] and "trial_ratio" not in rows[1]
    from compilepass.cli.tune import print_tune_table
    from compilepass.tuning.search import TuneResult

    verdict = {"ratio": 1.022, "low": 1.01, "high": 1.03, "n": 6}
    result = TuneResult("s", "mem", {}, {}, [], rows, defaults, None,
                        [{"flags": {"a": True}, "verified_ratio": verdict, "compile_ratio_in_process": 1.05}],
                        {"a": True}, "winner: ...", 1.0, 1.0, "compilepass tune")
    print_tune_table(result)
    out = capsys.readouterr().out
    assert "~5.520" in out and "~1.000" in out and "unverified" in out
    assert "1.022 (1.010-1.030)" in out and "1.05" in out


# -- item 7: the engine options are recorded --------------------------------------------------------


@pytest.mark.slow
def test_engine_options_reach_the_result_and_the_db_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("COMPILEPASS_CACHE_DIR", str(tmp_path / "cache"))
    spec = WorkloadSpec(kind="rollout", model="tiny", batch=1, prompt_len=4, new_tokens=2, device="cpu")
    result = Tuner(TuneConfig(workload=spec, trials=1, repeats=1, storage=f"sqlite:///{tmp_path}/s.db",
                              study_name="e")).run()
    assert result.defaults is not None, result.trials
    options = result.engine_options
    assert set(options) >= {"attention", "compile_scope", "graph_sampling", "fused_projections", "cuda_graphs"}
    assert options["cuda_graphs"] is False  # on the CPU
    assert json.loads(json.dumps(result.to_dict()))["engine_options"] == options
    entry = entry_from_tune_result(result)
    assert entry["engine_options"] == options
    mlp = entry_from_tune_result(dict(result.to_dict(), engine_options=None))
    assert mlp["engine_options"] is None

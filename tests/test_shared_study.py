"""One study, several tuners (issue 18 item 2): disjoint trials, an exact count, one verification and
one database record. The rules on a real journal-file storage, then two real ``compilepass tune``
processes on one study with the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import optuna
import pytest

from compilepass.core.errors import StorageError
from compilepass.core.procs import owner_tag
from compilepass.db import load_db
from compilepass.tuning.search import flag_key, measured_trials, open_storage
from compilepass.tuning.shared import COPY, DUPLICATE, MEASURE, NOT_NEEDED, claim, wait_until_idle

TINY_ARGS = ["--workload", "rollout", "--model", "tiny", "--device", "cpu", "--batch", "1", "--prompt-len", "4",
             "--new-tokens", "2", "--repeats", "1"]


def dead_owner() -> str:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return owner_tag(proc.pid)


@pytest.fixture
def study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(f"journal:{tmp_path / 'study.log'}", heartbeat_s=30)
    return optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"])


def running(study, flags=None, decision=None, owner=None):
    """A trial another tuner runs: its number, its owner, and (when written) its flag set and decision."""
    t = study.ask()
    t.set_user_attr("owner", owner or owner_tag())
    if flags is not None:
        t.set_user_attr("flags", flags)
    if decision is not None:
        t.set_user_attr("decision", decision)
    return t


def measured(study, flags):
    t = running(study, flags, MEASURE)
    t.set_user_attr("measured", True)
    study.tell(t, [100.0, 1.0])
    return t


def decide(study, flags, budget=10):
    t = running(study, flags)
    return t, claim(t, flag_key(flags), budget, flag_key)


def test_a_flag_set_is_measured_once_and_the_count_is_exact(study):
    a, b = {"size_asserts": False}, {"split_reductions": False}
    done = measured(study, {})
    t, (decision, other) = decide(study, {})
    assert (decision, other.number) == (COPY, done.number)  # measured already: copied, as in one tuner
    assert study.trials[t.number].user_attrs["decision"] == COPY
    first = running(study, a, MEASURE)
    _, (decision, other) = decide(study, a)
    assert (decision, other.number) == (DUPLICATE, first.number)  # another tuner measures it now
    _, (decision, _) = decide(study, b, budget=2)  # 1 measured + 1 measuring: the study has its 2
    assert decision == NOT_NEEDED
    _, (decision, _) = decide(study, b, budget=3)
    assert decision == MEASURE
    # a trial whose tuner died (this host, pid gone) is neither waited for nor counted
    running(study, {"aggressive_fusion": True}, MEASURE, owner=dead_owner())
    _, (decision, _) = decide(study, {"aggressive_fusion": True}, budget=4)
    assert decision == MEASURE


def test_a_trial_waits_for_the_decisions_of_lower_numbered_ones(study):
    a = {"size_asserts": False}
    lower = running(study)  # sampled, but its flags and decision are not written yet

    def decide_late():
        time.sleep(0.5)
        lower.set_user_attr("flags", a)
        lower.set_user_attr("decision", MEASURE)

    thread = threading.Thread(target=decide_late)
    thread.start()
    t0 = time.monotonic()
    _, (decision, other) = decide(study, a)
    thread.join()
    assert time.monotonic() - t0 >= 0.5
    assert (decision, other.number) == (DUPLICATE, lower.number)


def test_the_verifying_tuner_waits_for_the_others_trials(study):
    t = running(study, {}, MEASURE)
    threading.Timer(1.0, lambda: study.tell(t, [1.0, 1.0])).start()
    t0 = time.monotonic()
    assert wait_until_idle(study, timeout_s=30)
    assert time.monotonic() - t0 >= 1.0
    running(study, {}, MEASURE, owner=dead_owner())
    assert wait_until_idle(study, timeout_s=30)  # a dead tuner's trial is not waited for
    running(study, {}, MEASURE, owner=f"{os.getpid()}@another-host")
    assert not wait_until_idle(study, timeout_s=1)  # another host's: at most the timeout (no heartbeat)


def test_journal_storage_errors_are_one_line(tmp_path):
    for url in (f"journal:{tmp_path / 'no' / 'such' / 'dir.log'}", "journal:", f"journal:{tmp_path}"):
        with pytest.raises(StorageError, match="cannot open Optuna storage"):
            open_storage(url, heartbeat_s=30)


@pytest.mark.slow
def test_two_tuners_on_one_journal_study_measure_disjoint_trials_and_record_once(tmp_path):
    """A ``--worker`` and a verifying tuner share one journal-file study of 4 trials: each measures
    its own, no flag set twice, 4 in all; the verifying tuner waits for the worker's last trial,
    verifies once and records one entry; the worker records nothing."""
    journal = tmp_path / "study.log"
    cache = tmp_path / "cache"
    env = dict(os.environ, COMPILEPASS_CACHE_DIR=str(cache), TMPDIR=str(tmp_path))
    common = [sys.executable, "-m", "compilepass.cli", "tune", *TINY_ARGS, "--flags", "size_asserts",
              "split_reductions", "epilogue_fusion", "--trials", "4", "--verify-rounds", "3",
              "--storage", f"journal:{journal}", "--study-name", "shared"]
    procs = {}
    for role in ("worker", "verifier"):
        extra = ["--worker"] if role == "worker" else []
        procs[role] = subprocess.Popen(common + extra + ["--out", str(tmp_path / f"{role}.json")], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        outs = {role: p.communicate(timeout=500) for role, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for role, p in procs.items():
        assert p.returncode == 0, (role, outs[role][1][-3000:])

    study = optuna.load_study(study_name="shared", storage=open_storage(f"journal:{journal}", 30))
    done = measured_trials(study)
    assert len(done) == 4  # the study's --trials, not 4 per tuner
    assert len({t.number for t in done}) == 4 and len({flag_key(t.user_attrs["flags"]) for t in done}) == 4
    owners = {t.user_attrs["owner"] for t in done}
    assert owners == {owner_tag(procs["worker"].pid), owner_tag(procs["verifier"].pid)}  # both measured
    assert all(t.user_attrs["decision"] == MEASURE for t in done)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]

    worker = json.loads((tmp_path / "worker.json").read_text())
    verifier = json.loads((tmp_path / "verifier.json").read_text())
    assert worker["verification"] is None and worker["decision"].startswith("worker: measured ")
    assert "not recorded in the tuning database: a --worker only measures" in outs["worker"][0] + outs["worker"][1]
    assert sum(r["measured"] for r in verifier["trials"]) == 4  # it waited for the worker's last trial
    [entry] = load_db(cache / "tuning_db.json")["entries"]
    assert entry["provenance"]["study_name"] == "shared"
    if verifier["candidates"]:  # a flag set beat the defaults in its own trial: verified, once, here
        assert verifier["verification"]["status"] == "ok" and entry["measurements"]["verify_rounds"] == 3
    else:
        assert verifier["verification"] is None and entry["verdict"] == "keep-defaults"


OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from compilepass.tuning.search import open_storage
work, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for k in range(rounds):
    (work / f"ready-{k}-{me}").touch()
    while not (work / f"go-{k}").exists():
        time.sleep(0.001)
    try:
        open_storage(f"sqlite:///{work / f'db-{k}.sqlite'}", heartbeat_s=30)
    except Exception as exc:
        print(f"round {k}: {exc}", flush=True)
        sys.exit(1)
"""


@pytest.mark.slow
def test_workers_opening_one_new_sqlite_file_at_once_all_open_it(tmp_path):
    # Optuna checks for each table and then creates it, so workers starting together on a new SQLite
    # file raced ("table studies already exists", a duplicate alembic version row); it failed CI once
    workers, rounds = 6, 4
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, str(tmp_path), str(i), str(rounds)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(workers)]
    deadline = time.monotonic() + 240
    for k in range(rounds):
        while len(list(tmp_path.glob(f"ready-{k}-*"))) < workers:
            assert all(p.poll() is None for p in procs), [p.communicate()[0][-500:] for p in procs if p.poll()]
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.01)
        (tmp_path / f"go-{k}").touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * workers, [o[-500:] for o in outputs if o]
    for k in range(rounds):  # one schema each, which Optuna opens
        assert open_storage(f"sqlite:///{tmp_path / f'db-{k}.sqlite'}", heartbeat_s=30).get_all_studies() == []

"""Several tuners on one study: which trial measures, and when the study's measuring is done.

Any number of ``compilepass tune`` processes (one per GPU, or on several machines) can share one
study through its storage: an RDB URL, or a journal file (``journal:PATH``). Optuna gives each
trial a distinct number. These rules keep the workers' measurements disjoint and the count exact:

- A trial writes its flag set (user attr ``flags``) as soon as it is sampled. It then waits until
  every lower-numbered running trial of a live tuner has written its ``decision``. A trial decides
  only on lower-numbered ones, so the lowest running trial never waits.
- A flag set that a lower-numbered trial is measuring is not measured again: the trial is pruned
  (``duplicate_of``). One already measured is copied, as in a single tuner.
- A trial measures only while the measured trials plus the lower-numbered trials measuring now are
  fewer than ``--trials``. Otherwise it is pruned ("not needed").
- The tuner that verifies and records (any one started without ``--worker``) first waits until no
  trial of a live tuner is running. It then verifies once and records once.

A running trial's tuner counts as live unless its ``owner`` is on this host and gone. On an RDB
storage, Optuna's heartbeat fails the trials of a dead tuner on another host. A journal file has no
heartbeat, so such a trial is waited for at most ``timeout_s``.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Optional

from compilepass.core.procs import owner_alive

log = logging.getLogger("compilepass.tuning.shared")

MEASURE, COPY, DUPLICATE, GATED, NOT_NEEDED = "measure", "copy", "duplicate", "gated", "not needed"
DECIDE_TIMEOUT_S = 60.0  # a lower trial writes its decision within milliseconds of starting
POLL_S = 0.1


def _live(t) -> bool:
    owner = t.user_attrs.get("owner")
    if owner is None:  # a tuner writes its owner tag within milliseconds of creating the trial
        start = t.datetime_start
        return start is None or (datetime.now(start.tzinfo) - start).total_seconds() < DECIDE_TIMEOUT_S
    return owner_alive(owner)


def live_running(study, exclude: Optional[int] = None) -> list:
    """Running trials of live tuners (``exclude``: a trial number to leave out, e.g. one's own)."""
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.number != exclude and _live(t)]


def in_flight(study) -> list:
    """Running trials of live tuners that decided to measure."""
    return [t for t in live_running(study) if t.user_attrs.get("decision") == MEASURE]


def _fail_stale(study) -> None:
    import warnings

    import optuna
    from optuna.storages import fail_stale_trials

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)  # RDB with heartbeats: trials of dead tuners on other hosts; else a no-op


def wait_for_lower_decisions(study, number: int, timeout_s: float = DECIDE_TIMEOUT_S) -> None:
    """Until every lower-numbered running trial of a live tuner has written its decision."""
    deadline = time.monotonic() + timeout_s
    while True:
        pending = [t.number for t in live_running(study, exclude=number)
                   if t.number < number and "decision" not in t.user_attrs]
        if not pending:
            return
        if time.monotonic() >= deadline:
            log.warning("trial %d: trials %s wrote no decision within %.0f s; deciding without them", number,
                        pending, timeout_s)
            return
        time.sleep(POLL_S)


def claim(trial, key: str, budget: int, flag_key) -> tuple[str, Optional[object]]:
    """Decide whether ``trial`` (flag set ``key``) measures; write the decision. Returns (decision, other):
    ``(COPY, measured trial)``, ``(DUPLICATE, running trial)``, ``(NOT_NEEDED, None)`` or ``(MEASURE, None)``."""
    import optuna

    study = trial.study
    wait_for_lower_decisions(study, trial.number)
    state = optuna.trial.TrialState
    snapshot = study.get_trials(deepcopy=False)  # one read: a trial finishing now is counted once
    measured = [t for t in snapshot if t.state == state.COMPLETE and t.user_attrs.get("measured")]
    lower = [t for t in snapshot if t.state == state.RUNNING and t.number < trial.number and _live(t)
             and t.user_attrs.get("decision") == MEASURE]
    decision, other = MEASURE, None
    same = next((t for t in measured if flag_key(t.user_attrs.get("flags", {})) == key), None)
    running_same = next((t for t in lower if flag_key(t.user_attrs.get("flags", {})) == key), None)
    if same is not None:
        decision, other = COPY, same
    elif running_same is not None:
        decision, other = DUPLICATE, running_same
    elif len(measured) + len(lower) >= budget:
        decision = NOT_NEEDED
    trial.set_user_attr("decision", decision)
    return decision, other


def wait_until_idle(study, timeout_s: float, on_wait=None) -> bool:
    """Until no trial of a live tuner runs (the other workers' trials are finished). False when some
    still run after ``timeout_s`` (a dead tuner on another host, on a storage without heartbeats)."""
    deadline = time.monotonic() + timeout_s
    said = None
    while True:
        _fail_stale(study)
        running = sorted(t.number for t in live_running(study))
        if not running:
            return True
        if running != said:
            log.info("waiting for trials %s of other tuners on this study", running)
            if on_wait:
                on_wait(running)
            said = running
        if time.monotonic() >= deadline:
            log.warning("trials %s still run after %.0f s; going on without them", running, timeout_s)
            return False
        time.sleep(1.0)

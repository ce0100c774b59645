"""The search: an Optuna multi-objective study over the flag space, then a verification round.

``tune(TuneConfig(...))`` is the Python API under ``compilepass tune``:

1. torch's defaults are measured first (an enqueued trial), then Optuna's TPE sampler proposes flag
   sets to maximize throughput and minimize cold compile time. Every trial is one isolated process
   (:mod:`compilepass.tuning.trial`). Failed, OOM and timed-out trials are COMPLETE trials marked infeasible
   through the sampler's constraints; gated (known-bad) flag sets are recorded, never measured;
   a flag set already measured is not measured again.
2. The study lives in an Optuna storage (SQLite in the user cache dir by default, any storage
   URL, or a journal file ``journal:PATH``), which several tuners can share
   (:mod:`compilepass.tuning.shared`: disjoint trials, an exact count; ``worker=True`` measures
   only, the others verify and record once the workers' trials are done). Every finished trial is committed as it finishes, so a study killed with -9 resumes with
   every completed trial kept. A trial interrupted by Ctrl-C or SIGTERM is FAIL with the user attr
   ``abandoned``; one left RUNNING by a dead tuner on this host is made so when the study is opened
   next (elsewhere Optuna's heartbeat fails it); either flag set is enqueued again, once.
3. The Pareto candidates, faster than the defaults in their own trials (unverified), are verified
   side by side with the defaults (:mod:`compilepass.tuning.verify`); the winner is the one whose
   throughput ratio's 95% CI lies above ``1 + min_gain`` and, under the balanced policy, whose
   compile time measured in that same process is at most ``max_compile_ratio`` times the
   defaults'. Else the answer is "keep defaults".
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from compilepass.core.atomic import sweep_stale_temp_files
from compilepass.core.checks import check_int, check_positive, is_number
from compilepass.core.env import EnvironmentKey, current_environment
from compilepass.core.errors import ConfigError, StorageError
from compilepass.core.paths import cache_dir, cache_path
from compilepass.core.procs import interrupt_name, owner_alive, owner_tag, parse_owner_tag
from compilepass.core.workload_spec import WorkloadSpec
from compilepass.flags import FlagSpace
from compilepass.tuning.isolation import sweep_stale_run_dirs
from compilepass.tuning.shared import COPY, DUPLICATE, GATED, MEASURE, claim, in_flight, live_running, wait_until_idle
from compilepass.tuning.trial import TrialSpec, run_trial
from compilepass.tuning.verify import VerifyResult, VerifySpec, verify
from compilepass.tuning.workloads import validate_workload

log = logging.getLogger("compilepass.tuning.search")

POLICIES = ("balanced", "throughput")


@dataclass
class TuneConfig:
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    trials: int = 12  # measured trials (the defaults included), summed over resumes
    time_budget_s: Optional[float] = None  # wall-clock budget for this invocation's search phase
    storage: Optional[str] = None  # Optuna storage URL; default SQLite in the user cache dir
    study_name: Optional[str] = None
    policy: str = "balanced"
    max_compile_ratio: float = 1.2  # balanced: compile time at most this times the defaults'
    min_gain: float = 0.01  # a winner's whole 95% CI must lie above 1 + min_gain
    verify_candidates: int = 3
    verify_rounds: int = 12
    repeats: int = 10
    trial_timeout_s: float = 600.0
    include_flags: Optional[list] = None
    exclude_flags: list = field(default_factory=list)
    seed: int = 0
    heartbeat_s: int = 30
    verify: bool = True
    worker: bool = False  # measure trials of a shared study only; another tuner verifies and records

    def validate(self) -> None:
        """Every count and size (ConfigError, one line, named as its command-line option)."""
        validate_workload(self.workload)
        check_int("--trials", self.trials, 1)
        check_int("--repeats", self.repeats, 1)
        check_int("--verify-candidates", self.verify_candidates, 1)
        check_int("--verify-rounds", self.verify_rounds, 3, " for a confidence interval")
        check_int("heartbeat_s", self.heartbeat_s, 1)
        check_positive("--trial-timeout", self.trial_timeout_s, " seconds")
        check_positive("--max-compile-ratio", self.max_compile_ratio)
        if self.time_budget_s is not None:
            check_positive("--time-budget", self.time_budget_s, " seconds")
        if not is_number(self.min_gain) or not math.isfinite(self.min_gain) or self.min_gain < 0:
            raise ConfigError(f"min_gain must be a number >= 0, got {self.min_gain!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")


@dataclass
class TuneResult:
    study_name: str
    storage: str
    environment: dict
    workload: dict
    space: list
    trials: list
    defaults: Optional[dict]
    verification: Optional[dict]
    candidates: list
    winner: Optional[dict]  # effective flags of the verified winner; None = keep defaults
    decision: str
    search_wall_s: float
    verify_wall_s: float
    command: str
    engine_options: Optional[dict] = None  # the native engine's options the rollout ran with

    def to_dict(self) -> dict:
        return asdict(self)


def default_storage_url() -> str:
    """SQLite in the user cache dir (``COMPILEPASS_CACHE_DIR`` overrides the location)."""
    return "sqlite:///" + str(cache_dir() / "studies.db")


def study_name_for(env: EnvironmentKey, workload: WorkloadSpec, engine: str = "native") -> str:
    w = workload.to_dict()
    w.pop("engine", None)  # named once, below (native study names stay what they were)
    if not w.get("load_in_4bit"):
        w.pop("load_in_4bit", None)  # 16-bit study names stay what they were before the field
    key = json.dumps({"env": [env.torch, env.triton, env.vllm, env.device_name], "workload": w,
                      "engine": engine}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    model = Path(workload.model).name if os.sep in workload.model else workload.model
    quant = f"-{workload.quant()}" if workload.quant() else ""
    return f"{model}{quant}-{workload.kind}-{workload.size_bucket()}-{digest}"


JOURNAL_PREFIX = "journal:"


def open_storage(url: str, heartbeat_s: int):
    """An RDB URL (with heartbeats) or ``journal:PATH``, Optuna's journal file storage (a file several
    processes append to under a lock; it suits a shared file system where SQLite's locking fails)."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if url.startswith(JOURNAL_PREFIX):
        return _open_journal(url)

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_s,
                grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
            )

    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            return build()
        except Exception as exc:  # sqlalchemy / driver errors: one clear line
            if attempt < SCHEMA_RACE_RETRIES and lost_schema_race(exc):
                time.sleep(0.05 * (attempt + 1))  # the winner's tables are there now: open them
                continue
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StorageError(f"cannot open Optuna storage {url!r}: {msg}") from None


SCHEMA_RACE_RETRIES = 8
_SCHEMA_RACE_MARKS = ("already exists", "unique constraint failed: alembic_version",
                      "unique constraint failed: version_info", "duplicate key value violates unique constraint")


def lost_schema_race(exc: BaseException) -> bool:
    """True when opening a new database failed because another process created its tables at the same
    moment: Optuna checks for each table, then creates it, so two workers starting on one new SQLite
    file both try (`table studies already exists`, or a duplicate alembic version row). Opening again
    finds the finished schema."""
    text = str(exc).lower()
    return any(mark in text for mark in _SCHEMA_RACE_MARKS)


def _open_journal(url: str):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(url[len(JOURNAL_PREFIX):]).expanduser()
    if not url[len(JOURNAL_PREFIX):] or path.is_dir():
        raise StorageError(f"cannot open Optuna storage {url!r}: journal: takes a file path (journal:/dir/study.log)")
    if not path.parent.is_dir():
        raise StorageError(f"cannot open Optuna storage {url!r}: no directory {path.parent}")
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except Exception as exc:  # unreadable file, not a journal: one clear line
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"cannot open Optuna storage {url!r}: {msg}") from None


def flag_key(flags: dict) -> str:
    return json.dumps(flags, sort_keys=True)


_PRIMITIVE = (type(None), bool, int, float, str)
_JSON_PREFIX = "json:"


def encode_choice(value):
    """Optuna's categorical choices must be primitives: tuples and lists travel as JSON strings."""
    return value if isinstance(value, _PRIMITIVE) else _JSON_PREFIX + json.dumps(value)


def param_choices(spec) -> list:
    return [encode_choice(c) for c in spec.choices]


def decode_choice(value):
    if isinstance(value, str) and value.startswith(_JSON_PREFIX):
        return json.loads(value[len(_JSON_PREFIX):])
    return value


class _Objective:
    """Samples a flag set, skips gated and duplicate ones, measures the rest in isolation."""

    def __init__(self, config: TuneConfig, space: FlagSpace, on_trial: Optional[Callable] = None):
        self.config = config
        self.space = space
        self.on_trial = on_trial

    def sample(self, trial) -> dict:
        flags = {}
        for spec in self.space.specs:
            if spec.requires is not None:
                other, needed = spec.requires
                if flags.get(other, self.space.torch_defaults.get(other)) != needed:
                    continue
            flags[spec.name] = decode_choice(trial.suggest_categorical(spec.name, param_choices(spec)))
        return flags

    def __call__(self, trial) -> tuple[float, float]:
        try:
            trial.set_user_attr("owner", owner_tag())  # who to ask whether a RUNNING trial is still running
            return self._run(trial)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: Optuna fails the trial and re-raises
            trial.set_user_attr("abandoned", f"interrupted by {interrupt_name(exc)}")
            raise

    def _run(self, trial) -> tuple[float, float]:
        import optuna

        flags = self.sample(trial)
        effective = self.space.effective(flags)
        trial.set_user_attr("flags", effective)
        key = flag_key(effective)
        gates = self.space.violations(flags)
        if gates:
            trial.set_user_attr("decision", GATED)
            trial.set_user_attr("status", "gated")
            trial.set_user_attr("measured", False)
            trial.set_user_attr("error_tail", "; ".join(f"{g.reason} ({g.source})" for g in gates))
            return self._infeasible(trial)
        decision, other = claim(trial, key, self.config.trials, flag_key)  # other tuners on this study
        if decision == COPY:
            for k in ("status", "compile_s", "throughput", "error_tail"):
                if k in other.user_attrs:
                    trial.set_user_attr(k, other.user_attrs[k])
            trial.set_user_attr("measured", False)
            trial.set_user_attr("duplicate_of", other.number)
            trial.set_user_attr("feasible", bool(other.user_attrs.get("feasible")))
            trial.set_constraint("failed", 0.0 if other.user_attrs.get("feasible") else 1.0)
            if self.on_trial:
                self.on_trial(trial.number, effective, None)
            return tuple(other.values)
        if decision != MEASURE:  # measured by another tuner now, or the study has its --trials
            trial.set_user_attr("measured", False)
            trial.set_user_attr("status", decision)
            if decision == DUPLICATE:
                trial.set_user_attr("duplicate_of", other.number)
                if self.on_trial:
                    self.on_trial(trial.number, effective, None)
            raise optuna.TrialPruned(f"{decision}" + (f" of running trial {other.number}" if other else ""))
        result = run_trial(TrialSpec(self.config.workload, effective, repeats=self.config.repeats,
                                     timeout_s=self.config.trial_timeout_s))
        trial.set_user_attr("measured", True)
        trial.set_user_attr("status", result.status)
        trial.set_user_attr("compile_s", result.compile_s)
        trial.set_user_attr("throughput", result.throughput)
        trial.set_user_attr("throughput_repeats", result.throughput_repeats)
        trial.set_user_attr("wall_s", result.wall_s)
        trial.set_user_attr("cache", result.cache)
        engine_options = (result.details.get("workload") or {}).get("engine_options")
        if engine_options is not None:
            trial.set_user_attr("engine_options", engine_options)
        if not result.ok:
            trial.set_user_attr("error_tail", result.error_tail[-1500:])
        if self.on_trial:
            self.on_trial(trial.number, effective, result)
        if not result.ok:
            return self._infeasible(trial)
        trial.set_user_attr("feasible", True)
        trial.set_constraint("failed", 0.0)
        return result.throughput, result.compile_s

    def _infeasible(self, trial) -> tuple[float, float]:
        trial.set_user_attr("feasible", False)
        trial.set_constraint("failed", 1.0)  # Optuna: > 0 violates, the sampler treats it as infeasible
        return 0.0, float(self.config.trial_timeout_s)


def space_size(space: FlagSpace) -> int:
    """Distinct effective flag sets the space can produce."""
    import itertools

    seen = set()
    names = space.names
    for combo in itertools.product(*(space.spec(n).choices for n in names)):
        seen.add(flag_key(space.effective(dict(zip(names, combo)))))
    return len(seen)


class _QuietInterrupts(logging.Filter):
    """Optuna logs a trial that Ctrl-C or SIGTERM ended as a failure in two records, the first with
    the traceback; the tuner reports the interruption itself, in one line."""

    def __init__(self):
        super().__init__()
        self._follow_up: Optional[str] = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            self._follow_up = record.getMessage().split(" failed with parameters")[0] + " failed with value"
            return False
        if self._follow_up and record.getMessage().startswith(self._follow_up):
            self._follow_up = None
            return False
        return True


def _quiet_optuna() -> None:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _QuietInterrupts) for f in optimize_log.filters):
        optimize_log.addFilter(_QuietInterrupts())


def create_or_load_study(config: TuneConfig, space: FlagSpace, env: EnvironmentKey):
    import optuna

    _quiet_optuna()
    url = config.storage or default_storage_url()
    storage = open_storage(url, config.heartbeat_s)
    name = config.study_name or study_name_for(env, config.workload, config.workload.engine)
    seed = config.seed
    if config.worker:  # each worker its own proposals: a worker with the same seed would propose the same sets
        seed = int(hashlib.sha256(f"{config.seed} {owner_tag()}".encode()).hexdigest()[:8], 16)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                         n_startup_trials=max(4, min(8, config.trials // 2)))
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, load_if_exists=True,
                                    directions=["maximize", "minimize"])
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"cannot create or load study {name!r} in {url!r}: {msg}") from None
    meta = {"workload": config.workload.to_dict(), "environment": env.to_dict(), "space": space.names}
    stored = study.user_attrs.get("compilepass")
    if stored is not None:
        # studies from before the engine and 4-bit fields: the native engine, a 16-bit model
        was_workload = {"engine": "native", "load_in_4bit": False, **(stored.get("workload") or {})}
        if was_workload != meta["workload"] or stored.get("space") != meta["space"]:
            raise ConfigError(f"study {name!r} in {url} was created for another workload or flag space; "
                              f"pass --study-name to start a new one")
        then = stored.get("environment", {})
        keys = ("device_name", "torch", "triton", "vllm")
        if any(then.get(k) != meta["environment"][k] for k in keys):
            was = ", ".join(f"{k}={then.get(k)}" for k in keys)
            now = ", ".join(f"{k}={meta['environment'][k]}" for k in keys)
            raise ConfigError(f"study {name!r} was measured with {was}; this machine has {now}; "
                              f"measurements from different machines are not mixed: pass --study-name")
    try:  # a storage that reads but cannot be written fails here, before any trial runs
        if stored is None:
            study.set_user_attr("compilepass", meta)
        study.set_user_attr("compilepass_opened_by", owner_tag())
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"cannot write to Optuna storage {url!r}: {msg}") from None
    reclaim_abandoned(study, storage)
    return study, url


def reclaim_abandoned(study, storage) -> list[int]:
    """Trials that a dead tuner on this host left RUNNING become FAIL with the user attr
    ``abandoned``; every abandoned trial not retried yet is enqueued again, once (its flag set is
    measured first when the search resumes). Returns the numbers of the trials enqueued again."""
    import optuna

    state = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        owner = t.user_attrs.get("owner")
        if owner and not owner_alive(owner):
            pid = parse_owner_tag(owner)[0]
            storage.set_trial_user_attr(t._trial_id, "abandoned", f"its tuner (pid {pid}) died")
            storage.set_trial_state_values(t._trial_id, state.FAIL)
            log.info("trial %d: its tuner (pid %d) died; marked failed (abandoned)", t.number, pid)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    again = []
    for t in trials:
        if t.state == state.FAIL and t.user_attrs.get("abandoned") and t.number not in retried and t.params:
            attrs = {"retry_of": t.number}
            if "role" in t.user_attrs:
                attrs["role"] = t.user_attrs["role"]
            study.enqueue_trial(t.params, user_attrs=attrs)
            again.append(t.number)
    return again


def measured_trials(study) -> list:
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("measured")]


def run_search(config: TuneConfig, space: FlagSpace, study, on_trial: Optional[Callable] = None,
               wait_for_workers: bool = False, on_wait: Optional[Callable] = None) -> None:
    """Measure trials until ``config.trials`` measured trials exist (counting those other tuners on
    the study are measuring), the space is exhausted or time is up. ``wait_for_workers``: then wait
    until no other tuner's trial runs, and measure again if one of theirs was abandoned."""
    import optuna

    objective = _Objective(config, space, on_trial)
    defaults = {s.name: encode_choice(space.torch_defaults[s.name]) for s in space.specs
                if s.requires is None or space.torch_defaults.get(s.requires[0]) == s.requires[1]}
    if not any(flag_key(t.user_attrs.get("flags", {})) == flag_key({}) for t in measured_trials(study)):
        # an enqueued trial keeps its parameters in the fixed_params system attr; another tuner may run it now
        state = optuna.trial.TrialState
        already = any(t.state in (state.WAITING, state.RUNNING)
                      and (defaults in (t.params, t.system_attrs.get("fixed_params")) or t.user_attrs.get("flags") == {})
                      for t in study.get_trials(deepcopy=False))
        if not already:
            study.enqueue_trial(defaults, user_attrs={"role": "defaults"})
    total = space_size(space)
    deadline = time.monotonic() + config.time_budget_s if config.time_budget_s else None
    attempts = 0
    max_attempts = 4 * config.trials + 20
    idle_timeout = config.trial_timeout_s + 300  # a live tuner's trial is killed at its timeout

    while True:
        measured = measured_trials(study)
        flying = in_flight(study)
        seen = {flag_key(t.user_attrs.get("flags", {})) for t in measured + flying}
        full = len(measured) + len(flying) >= config.trials or len(seen) >= total or attempts >= max_attempts
        late = deadline is not None and time.monotonic() >= deadline
        if full or late:
            if late and not full:
                log.info("time budget reached after %d measured trials", len(measured))
            if wait_for_workers and live_running(study):
                if wait_until_idle(study, idle_timeout, on_wait) and not late:
                    continue  # their trials are done: count again (one may have been abandoned)
            break
        attempts += 1
        study.optimize(objective, n_trials=1, catch=(), gc_after_trial=False)


def pareto_candidates(study, space: FlagSpace) -> list[dict]:
    """Feasible, measured, non-dominated trials (maximize throughput, minimize compile time)."""
    rows = [t for t in measured_trials(study) if t.user_attrs.get("feasible")]
    front = []
    for t in rows:
        tp, cs = t.user_attrs["throughput"], t.user_attrs["compile_s"]
        dominated = any(
            (o.user_attrs["throughput"] >= tp and o.user_attrs["compile_s"] <= cs)
            and (o.user_attrs["throughput"] > tp or o.user_attrs["compile_s"] < cs)
            for o in rows
        )
        if not dominated:
            front.append({"number": t.number, "flags": t.user_attrs["flags"], "throughput": tp, "compile_s": cs})
    return sorted(front, key=lambda r: -r["throughput"])


def select_candidates(front: list[dict], defaults: Optional[dict], config: TuneConfig) -> tuple[list[dict], str]:
    """Pick the Pareto points worth verifying (at most ``verify_candidates``): those faster than the
    defaults in their own trials. The trials ran one after another, so their ratios are unverified:
    they choose what is verified, not what wins. Under the balanced policy the ones whose trial
    compile time is within the limit are verified first; the limit itself is judged in
    :func:`decide`, on compile times measured side by side."""
    if defaults is None:
        return [], "the defaults trial did not complete; nothing to compare against"
    picks = []
    for row in front:
        if not row["flags"]:
            continue  # that is the defaults
        if row["throughput"] <= defaults["throughput"]:
            continue  # not faster even in its own trial
        compile_ratio = row["compile_s"] / defaults["compile_s"] if defaults["compile_s"] else math.inf
        picks.append(dict(row, unverified_trial_ratio=row["throughput"] / defaults["throughput"],
                          unverified_compile_ratio=compile_ratio))
    if config.policy == "balanced":
        picks.sort(key=lambda r: r["unverified_compile_ratio"] > config.max_compile_ratio)  # stable: by throughput
    picks = picks[: config.verify_candidates]
    if not picks:
        return [], "no measured flag set was faster than the defaults in its own trial"
    return picks, ""


def _compile_ratio_in_process(verdict, verification: VerifyResult) -> Optional[float]:
    base, mine = verification.defaults_compile_s_in_process, verdict.compile_s_in_process
    return mine / base if base and mine is not None else None


def decide(picks: list[dict], verification: Optional[VerifyResult], min_gain: float = 0.01,
           max_compile_ratio: Optional[float] = None) -> tuple[Optional[dict], str, list[dict]]:
    """The verified winner or None for "keep defaults".

    The winner is the candidate with the highest geometric-mean ratio among those whose 95% CI lies
    above ``1 + min_gain`` and (when ``max_compile_ratio`` is given: the balanced policy) whose
    compile time in the verification process is at most ``max_compile_ratio`` times the defaults'
    there. The decision text names a faster candidate that the compile limit excluded."""
    if verification is None or verification.status != "ok":
        why = verification.error_tail.strip().splitlines()[-1] if verification and verification.error_tail else ""
        return None, f"keep defaults: verification did not complete ({why})", []
    rows = []
    for pick, verdict in zip(picks, verification.verdicts()):
        ci = verdict.ci
        compile_ratio = _compile_ratio_in_process(verdict, verification)
        within = max_compile_ratio is None or (compile_ratio is not None and compile_ratio <= max_compile_ratio)
        rows.append(dict(pick, verified_ratio=verdict.ratio, verify_status=verdict.status,
                         compile_ratio_in_process=compile_ratio, within_compile_limit=within,
                         beats_defaults=bool(ci and ci.beats(1.0 + min_gain))))
    beating = [r for r in rows if r["beats_defaults"]]
    winners = [r for r in beating if r["within_compile_limit"]]
    too_slow = [r for r in beating if not r["within_compile_limit"]]

    def compile_note(r: dict) -> str:
        ratio = r["compile_ratio_in_process"]
        compiled = f"compiles {ratio:.2f}x" if ratio is not None else "has no compile time"
        return (f"{compiled} the defaults' in the verification process, above --max-compile-ratio "
                f"{max_compile_ratio:g}")

    if not winners:
        if too_slow:
            best = max(too_slow, key=lambda r: r["verified_ratio"]["ratio"])
            ci = best["verified_ratio"]
            return None, (f"keep defaults: the fastest candidate that beats torch's defaults ({ci['ratio']:.3f}x, "
                          f"95% CI {ci['low']:.3f}-{ci['high']:.3f}) {compile_note(best)}"), rows
        best = max((r for r in rows if r["verified_ratio"]), key=lambda r: r["verified_ratio"]["ratio"], default=None)
        if best is None:
            return None, "keep defaults: no candidate could be measured side by side", rows
        ci = best["verified_ratio"]
        return None, (f"keep defaults: no candidate beats torch's defaults by {min_gain:.0%} with 95% confidence "
                      f"(best ratio "
                      f"{ci['ratio']:.3f}, 95% CI {ci['low']:.3f}-{ci['high']:.3f})"), rows
    win = max(winners, key=lambda r: r["verified_ratio"]["ratio"])
    ci = win["verified_ratio"]
    compiled = (f"compile {win['compile_ratio_in_process']:.2f}x the defaults' in the same process"
                if win["compile_ratio_in_process"] is not None else "compile time not measured")
    text = (f"winner: {ci['ratio']:.3f}x the defaults' throughput (95% CI {ci['low']:.3f}-{ci['high']:.3f}), "
            f"{compiled}")
    faster = [r for r in too_slow if r["verified_ratio"]["ratio"] > ci["ratio"]]
    if faster:
        best = max(faster, key=lambda r: r["verified_ratio"]["ratio"])
        text += f"; a faster candidate ({best['verified_ratio']['ratio']:.3f}x) {compile_note(best)}"
    return win["flags"], text, rows


def trial_rows(study, defaults: Optional[dict] = None) -> list[dict]:
    """One row per trial; ``unverified_trial_ratio`` is its throughput over the defaults trial's,
    measured in different processes one after another (never side by side)."""
    rows = []
    base = (defaults or {}).get("throughput")
    for t in study.get_trials(deepcopy=False):
        throughput = t.user_attrs.get("throughput")
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "status": t.user_attrs.get("status", t.state.name.lower()),
            "flags": t.user_attrs.get("flags", t.params),
            "compile_s": t.user_attrs.get("compile_s"),
            "throughput": throughput,
            "unverified_trial_ratio": throughput / base if base and throughput else None,
            "throughput_repeats": t.user_attrs.get("throughput_repeats"),
            "measured": bool(t.user_attrs.get("measured")),
            "duplicate_of": t.user_attrs.get("duplicate_of"),
            "cache": t.user_attrs.get("cache"),
            "error_tail": t.user_attrs.get("error_tail", ""),
            "abandoned": t.user_attrs.get("abandoned"),
        })
    return rows


def sweep_leftovers() -> list:
    """Remove what killed tuners and writers left: trial run directories under the temp dir and
    atomic-write temp files in the cache dir, only where their owner no longer runs."""
    return sweep_stale_run_dirs() + sweep_stale_temp_files(cache_path())


class Tuner:
    """A prepared tuning run: construction validates the config, sweeps what killed runs left,
    builds the flag space and opens (or resumes) the study, so every user error surfaces before any
    measurement starts."""

    def __init__(self, config: TuneConfig):
        config.validate()
        self.config = config
        for path in sweep_leftovers():
            log.info("removed %s (left by a process that no longer runs)", path)
        self.env = current_environment()
        device_kind = "cuda" if config.workload.resolved_device().startswith("cuda") else "cpu"
        exclude = list(config.exclude_flags)
        if config.workload.kind == "rollout" and config.workload.engine == "native" \
                and "triton.cudagraphs" not in exclude and "triton.cudagraphs" not in (config.include_flags or ()):
            exclude.append("triton.cudagraphs")  # the native engine captures its own graphs (forced off inside)
        self.space = FlagSpace(device_kind=device_kind, env=self.env, include=config.include_flags,
                               exclude=exclude, engine=config.workload.engine)
        if not self.space.specs:
            raise ConfigError("the flag space is empty for this device and torch; nothing to tune")
        self.study, self.storage_url = create_or_load_study(config, self.space, self.env)

    def run(self, on_trial: Optional[Callable] = None, on_phase: Optional[Callable] = None) -> TuneResult:
        """Search, verify and decide. Safe to call again with the same storage: it resumes."""
        config, space, study = self.config, self.space, self.study
        t0 = time.perf_counter()
        if on_phase:
            on_phase("search", study)
        run_search(config, space, study, on_trial, wait_for_workers=not config.worker,
                   on_wait=(lambda running: on_phase("wait", running)) if on_phase else None)
        search_wall = time.perf_counter() - t0

        measured = measured_trials(study)
        defaults_trial = next((t for t in measured if t.user_attrs.get("flags") == {} and t.user_attrs.get("feasible")),
                              None)
        defaults = None if defaults_trial is None else {
            "number": defaults_trial.number, "throughput": defaults_trial.user_attrs["throughput"],
            "compile_s": defaults_trial.user_attrs["compile_s"]}
        picks, why = select_candidates(pareto_candidates(study, space), defaults, config)
        verification = None
        t1 = time.perf_counter()
        if config.worker:
            mine = sum(1 for t in measured if t.user_attrs.get("owner") == owner_tag())
            winner, decision, rows = None, (f"worker: measured {mine} trials ({len(measured)} in the study so far); "
                                            f"the tuner started without --worker verifies and records"), []
        elif picks and config.verify:
            if on_phase:
                on_phase("verify", picks)
            verification = verify(VerifySpec(config.workload, {}, [p["flags"] for p in picks],
                                             rounds=config.verify_rounds,
                                             timeout_s=max(config.trial_timeout_s * (len(picks) + 1), 600)))
            limit = config.max_compile_ratio if config.policy == "balanced" else None
            winner, decision, rows = decide(picks, verification, config.min_gain, limit)
        elif picks:
            winner, decision, rows = None, "keep defaults: verification was switched off, so no winner is declared", picks
        else:
            winner, decision, rows = None, f"keep defaults: {why}", []
        verify_wall = time.perf_counter() - t1
        return TuneResult(
            study_name=study.study_name, storage=self.storage_url, environment=self.env.to_dict(),
            workload=config.workload.to_dict(), space=space.describe(), trials=trial_rows(study, defaults),
            defaults=defaults, verification=None if verification is None else verification.to_dict(),
            candidates=rows, winner=winner, decision=decision, search_wall_s=search_wall, verify_wall_s=verify_wall,
            command=" ".join(shlex.quote(a) for a in sys.argv),
            engine_options=_engine_options(defaults_trial, measured, verification),
        )


def _engine_options(defaults_trial, measured: list, verification: Optional[VerifyResult]) -> Optional[dict]:
    """The engine options the rollout ran with (the engine's own defaults: the same in every trial)."""
    for t in ([defaults_trial] if defaults_trial is not None else []) + list(measured):
        if t.user_attrs.get("engine_options") is not None:
            return t.user_attrs["engine_options"]
    return verification.engine_options if verification is not None else None


def tune(config: TuneConfig, on_trial: Optional[Callable] = None, on_phase: Optional[Callable] = None) -> TuneResult:
    """Search, verify and decide (``Tuner(config).run(...)``). Resumes a study with the same name and storage."""
    return Tuner(config).run(on_trial, on_phase)

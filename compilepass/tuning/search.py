"""The search: an Optuna multi-objective study over the flag space, then a verification round.

``tune(TuneConfig(...))`` is the Python API under ``compilepass tune``:

1. torch's defaults are measured first (an enqueued trial), then Optuna's TPE sampler proposes flag
   sets to maximize throughput and minimize cold compile time. Every trial is one isolated process
   (:mod:`compilepass.tuning.trial`). Failed, OOM and timed-out trials are COMPLETE trials marked infeasible
   through the sampler's constraints; gated (known-bad) flag sets are recorded, never measured;
   a flag set already measured is not measured again.
2. The study lives in an Optuna storage (SQLite in the user cache dir by default, or any storage
   URL). Every finished trial is committed as it finishes, so a study killed with -9 resumes with
   every completed trial kept; trials left RUNNING by a dead process are failed by Optuna's
   heartbeat and their flag sets retried.
3. The Pareto candidates that pass the compile-time policy are verified side by side with the
   defaults (:mod:`compilepass.tuning.verify`); the winner is the one whose throughput ratio's 95% CI lies
   above 1, else the answer is "keep defaults".
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

from compilepass.core.env import EnvironmentKey, current_environment
from compilepass.core.errors import ConfigError, StorageError
from compilepass.core.paths import cache_dir
from compilepass.core.workload_spec import WorkloadSpec
from compilepass.flags import FlagSpace
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

    def validate(self) -> None:
        validate_workload(self.workload)
        if self.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {self.trials}")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError("--time-budget must be positive")
        if self.verify_rounds < 3:
            raise ConfigError("--verify-rounds must be >= 3 for a confidence interval")


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

    def to_dict(self) -> dict:
        return asdict(self)


def default_storage_url() -> str:
    """SQLite in the user cache dir (``COMPILEPASS_CACHE_DIR`` overrides the location)."""
    return "sqlite:///" + str(cache_dir() / "studies.db")


def study_name_for(env: EnvironmentKey, workload: WorkloadSpec, engine: str = "native") -> str:
    w = workload.to_dict()
    w.pop("engine", None)  # named once, below (native study names stay what they were)
    key = json.dumps({"env": [env.torch, env.triton, env.vllm, env.device_name], "workload": w,
                      "engine": engine}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    model = Path(workload.model).name if os.sep in workload.model else workload.model
    return f"{model}-{workload.kind}-{workload.size_bucket()}-{digest}"


def open_storage(url: str, heartbeat_s: int):
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_s,
                grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
            )
    except Exception as exc:  # sqlalchemy / driver errors: one clear line
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
        import optuna

        flags = self.sample(trial)
        effective = self.space.effective(flags)
        trial.set_user_attr("flags", effective)
        key = flag_key(effective)
        gates = self.space.violations(flags)
        if gates:
            trial.set_user_attr("status", "gated")
            trial.set_user_attr("measured", False)
            trial.set_user_attr("error_tail", "; ".join(f"{g.reason} ({g.source})" for g in gates))
            return self._infeasible(trial)
        for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if other.user_attrs.get("measured") and flag_key(other.user_attrs.get("flags", {})) == key:
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
        result = run_trial(TrialSpec(self.config.workload, effective, repeats=self.config.repeats,
                                     timeout_s=self.config.trial_timeout_s))
        trial.set_user_attr("measured", True)
        trial.set_user_attr("status", result.status)
        trial.set_user_attr("compile_s", result.compile_s)
        trial.set_user_attr("throughput", result.throughput)
        trial.set_user_attr("throughput_repeats", result.throughput_repeats)
        trial.set_user_attr("wall_s", result.wall_s)
        trial.set_user_attr("cache", result.cache)
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


def create_or_load_study(config: TuneConfig, space: FlagSpace, env: EnvironmentKey):
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    url = config.storage or default_storage_url()
    storage = open_storage(url, config.heartbeat_s)
    name = config.study_name or study_name_for(env, config.workload, config.workload.engine)
    sampler = optuna.samplers.TPESampler(seed=config.seed, multivariate=True,
                                         n_startup_trials=max(4, min(8, config.trials // 2)))
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, load_if_exists=True,
                                    directions=["maximize", "minimize"])
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"cannot create or load study {name!r} in {url!r}: {msg}") from None
    meta = {"workload": config.workload.to_dict(), "environment": env.to_dict(), "space": space.names}
    stored = study.user_attrs.get("compilepass")
    if stored is None:
        study.set_user_attr("compilepass", meta)
    else:
        was_workload = {"engine": "native", **(stored.get("workload") or {})}  # studies from before engines
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
    return study, url


def measured_trials(study) -> list:
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("measured")]


def run_search(config: TuneConfig, space: FlagSpace, study, on_trial: Optional[Callable] = None) -> None:
    """Measure trials until ``config.trials`` measured trials exist, the space is exhausted or time is up."""
    import optuna

    objective = _Objective(config, space, on_trial)
    defaults = {s.name: encode_choice(space.torch_defaults[s.name]) for s in space.specs
                if s.requires is None or space.torch_defaults.get(s.requires[0]) == s.requires[1]}
    if not any(flag_key(t.user_attrs.get("flags", {})) == flag_key({}) for t in measured_trials(study)):
        already = any(t.state == optuna.trial.TrialState.WAITING and t.params == defaults
                      for t in study.get_trials(deepcopy=False))
        if not already:
            study.enqueue_trial(defaults, user_attrs={"role": "defaults"})
    total = space_size(space)
    deadline = time.monotonic() + config.time_budget_s if config.time_budget_s else None
    attempts = 0
    max_attempts = 4 * config.trials + 20

    while True:
        measured = measured_trials(study)
        seen = {flag_key(t.user_attrs.get("flags", {})) for t in measured}
        if len(measured) >= config.trials or len(seen) >= total or attempts >= max_attempts:
            break
        if deadline is not None and time.monotonic() >= deadline:
            log.info("time budget reached after %d measured trials", len(measured))
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
    """Pick the Pareto points worth verifying under the policy (at most ``verify_candidates``)."""
    if defaults is None:
        return [], "the defaults trial did not complete; nothing to compare against"
    picks = []
    for row in front:
        if not row["flags"]:
            continue  # that is the defaults
        if row["throughput"] <= defaults["throughput"]:
            continue  # not faster even in its own trial
        ratio = row["compile_s"] / defaults["compile_s"] if defaults["compile_s"] else math.inf
        row = dict(row, compile_ratio=ratio)
        if config.policy == "balanced" and ratio > config.max_compile_ratio:
            continue
        picks.append(row)
    picks = picks[: config.verify_candidates]
    if not picks:
        why = ("no measured flag set was faster than the defaults" if config.policy != "balanced" else
               f"no measured flag set was faster than the defaults with compile time <= "
               f"{config.max_compile_ratio:g}x the defaults'")
        return [], why
    return picks, ""


def decide(picks: list[dict], verification: Optional[VerifyResult], min_gain: float = 0.01
           ) -> tuple[Optional[dict], str, list[dict]]:
    """The verified winner (highest geometric-mean ratio among those whose 95% CI lies above
    ``1 + min_gain``) or None for "keep defaults"."""
    if verification is None or verification.status != "ok":
        why = verification.error_tail.strip().splitlines()[-1] if verification and verification.error_tail else ""
        return None, f"keep defaults: verification did not complete ({why})", []
    rows = []
    for pick, verdict in zip(picks, verification.verdicts()):
        ci = verdict.ci
        rows.append(dict(pick, verified_ratio=verdict.ratio, verify_status=verdict.status,
                         beats_defaults=bool(ci and ci.beats(1.0 + min_gain))))
    winners = [r for r in rows if r["beats_defaults"]]
    if not winners:
        best = max((r for r in rows if r["verified_ratio"]), key=lambda r: r["verified_ratio"]["ratio"], default=None)
        if best is None:
            return None, "keep defaults: no candidate could be measured side by side", rows
        ci = best["verified_ratio"]
        return None, (f"keep defaults: no candidate beats torch's defaults by {min_gain:.0%} with 95% confidence "
                      f"(best ratio "
                      f"{ci['ratio']:.3f}, 95% CI {ci['low']:.3f}-{ci['high']:.3f})"), rows
    win = max(winners, key=lambda r: r["verified_ratio"]["ratio"])
    ci = win["verified_ratio"]
    return win["flags"], (f"winner: {ci['ratio']:.3f}x the defaults' throughput (95% CI {ci['low']:.3f}-"
                          f"{ci['high']:.3f}), compile {win['compile_ratio']:.2f}x the defaults'"), rows


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "status": t.user_attrs.get("status", t.state.name.lower()),
            "flags": t.user_attrs.get("flags", t.params),
            "compile_s": t.user_attrs.get("compile_s"),
            "throughput": t.user_attrs.get("throughput"),
            "throughput_repeats": t.user_attrs.get("throughput_repeats"),
            "measured": bool(t.user_attrs.get("measured")),
            "duplicate_of": t.user_attrs.get("duplicate_of"),
            "cache": t.user_attrs.get("cache"),
            "error_tail": t.user_attrs.get("error_tail", ""),
        })
    return rows


class Tuner:
    """A prepared tuning run: construction validates the config, builds the flag space and opens
    (or resumes) the study, so every user error surfaces before any measurement starts."""

    def __init__(self, config: TuneConfig):
        config.validate()
        self.config = config
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
        run_search(config, space, study, on_trial)
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
        if picks and config.verify:
            if on_phase:
                on_phase("verify", picks)
            verification = verify(VerifySpec(config.workload, {}, [p["flags"] for p in picks],
                                             rounds=config.verify_rounds,
                                             timeout_s=max(config.trial_timeout_s * (len(picks) + 1), 600)))
            winner, decision, rows = decide(picks, verification, config.min_gain)
        elif picks:
            winner, decision, rows = None, "keep defaults: verification was switched off, so no winner is declared", picks
        else:
            winner, decision, rows = None, f"keep defaults: {why}", []
        verify_wall = time.perf_counter() - t1
        return TuneResult(
            study_name=study.study_name, storage=self.storage_url, environment=self.env.to_dict(),
            workload=config.workload.to_dict(), space=space.describe(), trials=trial_rows(study), defaults=defaults,
            verification=None if verification is None else verification.to_dict(),
            candidates=rows, winner=winner, decision=decision, search_wall_s=search_wall, verify_wall_s=verify_wall,
            command=" ".join(shlex.quote(a) for a in sys.argv),
        )


def tune(config: TuneConfig, on_trial: Optional[Callable] = None, on_phase: Optional[Callable] = None) -> TuneResult:
    """Search, verify and decide (``Tuner(config).run(...)``). Resumes a study with the same name and storage."""
    return Tuner(config).run(on_trial, on_phase)

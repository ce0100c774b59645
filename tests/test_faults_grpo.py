"""Faults and bad input for `compilepass grpo` and `bench context` (CPU, real processes, real signals).

Crashes: kill -9 during generation, during training (mid gradient accumulation) and during a
checkpoint write; a checkpoint write that fails under RLIMIT_FSIZE; SIGTERM from outside during a
step; SIGINT during training. Each moment is chosen by a ``faults=`` hook in the child
(tests/faults.py); each run is then resumed with run.resume=auto and compared, metric for metric,
with one uninterrupted run. In process: stop requests between steps, during a save and twice;
resume=auto past bad checkpoints; the per-step lines; reward metric names; bad counts and sizes.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faults import cli_with_fault
from test_grpo import _cli, _config, _env, assert_same_metrics

from compilepass import cli
from compilepass.core.errors import CompilepassError, ConfigError
from compilepass.standby.grpo.checkpoint import CheckpointError, find_latest, find_latest_valid, verify_checkpoint
from compilepass.standby.grpo.config import GenerationConfig, GRPOConfig, ModelConfig, OptimConfig, RunConfig
from compilepass.standby.grpo.metrics import ProgressBar, read_metrics
from compilepass.standby.grpo.trainer import GRPOTrainer, TrainingInterrupted, run_grpo

STEPS = 8
# 16 sequences per step, 4 per forward: a kill "during training" lands between micro-batches.
COMMON = ["grpo", "--preset", "tiny", f"run.max_steps={STEPS}", "run.save_every=2", "run.keep_last=3",
          "data.prompts_per_step=4", "generation.num_generations=4", "optim.micro_batch_size=4"]


def _run(out: Path, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    args = COMMON + [f"run.output_dir={out}"]
    argv = cli_with_fault(fault) + args if fault else _cli(args)
    return subprocess.run(argv, env=_env(), capture_output=True, text=True, cwd=out.parent, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One uninterrupted run of COMMON: its directory and its metrics records."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = _run(out)
    assert r.returncode == 0, r.stderr
    return out, read_metrics(out / "metrics.jsonl")


def _resume_matches(out: Path, reference, from_step: int) -> str:
    """Resume ``out`` with the same command (stderr a pipe: the per-step lines), check the resume
    line, one line per step after ``from_step`` and the metrics against the reference."""
    r = _run(out)
    assert r.returncode == 0, r.stderr
    assert f"grpo: resumed from {out / f'step-{from_step:08d}'} (step {from_step})" in r.stderr.splitlines(), r.stderr
    steps = [int(ln.split()[2].split("/")[0]) for ln in r.stderr.splitlines() if ln.startswith("grpo: step ")]
    assert steps == list(range(from_step + 1, STEPS + 1)), r.stderr
    assert_same_metrics(read_metrics(out / "metrics.jsonl"), reference[1], STEPS)
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())
    return r.stderr


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("compilepass: ")]


# ------------------------------------------------------------------------------- kill -9 and resume


@pytest.mark.slow
@pytest.mark.parametrize("fault, logged, resumed_at", [
    ('faults.kill_at("generate", 5)', 4, 4),              # at the start of step 5's generation
    ('faults.kill_at("forward", 4, nth=3)', 3, 2),        # step 4, after two of its four micro-batches
    ('faults.kill_at("checkpoint:state", 4)', 4, 2),      # step 4's save: adapter and half the state written
    ('faults.kill_at("checkpoint:renamed", 4)', 4, 4),    # step 4's save committed, `latest` not yet moved
], ids=["generation", "training", "checkpoint-write", "checkpoint-committed"])
def test_kill9_then_resume_matches_uninterrupted(tmp_path, reference, fault, logged, resumed_at):
    out = tmp_path / "run"
    r = _run(out, fault)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert [rec["step"] for rec in read_metrics(out / "metrics.jsonl")] == list(range(1, logged + 1))
    assert find_latest(out) == out / f"step-{resumed_at:08d}"
    _resume_matches(out, reference, resumed_at)


@pytest.mark.slow
def test_checkpoint_write_failing_under_file_size_limit(tmp_path, reference):
    """RLIMIT_FSIZE set once step 4's adapter is written: its trainer_state.pt write fails half-way.
    The run ends with one line naming the checkpoint that is still the newest (step 2, untouched
    and valid); the torn save leaves nothing behind; resume=auto continues from step 2."""
    limit = (reference[0] / f"step-{STEPS:08d}" / "trainer_state.pt").stat().st_size // 2
    out = tmp_path / "run"
    r = _run(out, f'faults.file_size_limit_at("checkpoint:adapter", 4, {limit})')
    assert r.returncode == 2, r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("compilepass: error: cannot write checkpoint step-00000004"), r.stderr
    assert "writing trainer_state.pt failed" in lines[0] and f"RLIMIT_FSIZE, ulimit -f) is {limit} bytes" in lines[0]
    assert lines[0].endswith("; step-00000002 is still the newest checkpoint") and "Traceback" not in r.stderr
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())
    verify_checkpoint(out / "step-00000002")
    assert find_latest(out) == out / "step-00000002"
    _resume_matches(out, reference, 2)


# ------------------------------------------------------------------------------- SIGTERM and SIGINT


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resumes(tmp_path, reference):
    """SIGTERM sent from outside while step 4 runs (its generation is held open by a pause hook):
    the step is abandoned, the state as of step 3 is saved, one line says where, exit 143."""
    out = tmp_path / "run"
    marker = tmp_path / "in-step-4"
    argv = cli_with_fault(f'faults.pause_at("generate", 4, {str(marker)!r})') + COMMON + [f"run.output_dir={out}"]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "step 4 never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    lines = _error_lines(stderr)
    assert lines == [f"compilepass: stopped by SIGTERM: state as of step 3 saved in {out / 'step-00000003'}; "
                     f"the same command continues (run.resume=auto)"], stderr
    assert "Traceback" not in stderr
    verify_checkpoint(out / "step-00000003")
    _resume_matches(out, reference, 3)


@pytest.mark.slow
def test_sigint_during_training_exits_130_and_resumes(tmp_path, reference):
    """SIGINT (Ctrl-C) between step 3's first two micro-batches: the step is abandoned before its
    update; the state as of step 2 is the step-2 checkpoint already there; exit 130."""
    out = tmp_path / "run"
    r = _run(out, 'faults.signal_at("forward", 3, faults.signal.SIGINT, nth=2)')
    assert r.returncode == 130, r.stderr
    assert _error_lines(r.stderr) == [f"compilepass: stopped by SIGINT: state as of step 2 saved in "
                                      f"{out / 'step-00000002'}; the same command continues (run.resume=auto)"]
    assert [rec["step"] for rec in read_metrics(out / "metrics.jsonl")] == [1, 2]
    _resume_matches(out, reference, 2)


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_with_a_warning(tmp_path, reference):
    """The issue's case: the newest checkpoint's adapter truncated. resume=auto names it and why in
    one warning (no -v), resumes from the one before, leaves the bad one in place until step 8 is
    saved again, and ends as the uninterrupted run did."""
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    adapter = out / f"step-{STEPS:08d}" / "adapter_model.safetensors"
    size = adapter.stat().st_size
    adapter.write_bytes(adapter.read_bytes()[: size // 2])
    stderr = _resume_matches(out, reference, STEPS - 2)
    warnings = [ln for ln in stderr.splitlines() if "skipping checkpoint" in ln]
    assert warnings == [f"compilepass.standby.grpo.trainer: skipping checkpoint {out / f'step-{STEPS:08d}'}: "
                        f"adapter_model.safetensors is {size // 2} bytes, meta.json recorded {size} "
                        f"(truncated or overwritten)"], stderr
    verify_checkpoint(out / f"step-{STEPS:08d}")  # saved again by the resumed run


# ------------------------------------------------------------------------ stop requests in process


SMALL = ("run.max_steps=5", "run.save_every=2", "data.prompts_per_step=2", "generation.num_generations=4")


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("small")
    return run_grpo(_config(tmp, *SMALL), progress=False).metrics


def _interrupt(tmp_path, name, **kwargs) -> TrainingInterrupted:
    trainer = GRPOTrainer(_config(tmp_path, *SMALL, name=name), progress=False, **kwargs)
    try:
        with pytest.raises(TrainingInterrupted) as ei:
            trainer.train()
    finally:
        trainer.close()
    return ei.value


def test_stop_between_steps_and_during_a_save(tmp_path, small_reference):
    """SIGTERM from on_step after step 3: step 3 finishes and is saved (it was not due). SIGINT
    during step 2's own save: the save completes and is the stop's checkpoint. Both resume to the
    uninterrupted run's metrics; the handlers are restored afterwards."""
    import os

    from faults import signal_at

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    e = _interrupt(tmp_path, "between",
                   on_step=lambda step, rec: step == 3 and os.kill(os.getpid(), signal.SIGTERM))
    assert (e.signum, e.step, e.checkpoint, e.exit_code) == (signal.SIGTERM, 3, tmp_path / "between" / "step-00000003", 143)
    e2 = _interrupt(tmp_path, "saving", faults=signal_at("checkpoint:state", 2, signal.SIGINT))
    assert (e2.step, e2.checkpoint, e2.exit_code) == (2, tmp_path / "saving" / "step-00000002", 130)
    assert [s.name for s in sorted((tmp_path / "saving").glob("step-*"))] == ["step-00000002"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    for name in ("between", "saving"):
        run_grpo(_config(tmp_path, *SMALL, name=name), progress=False)
        assert_same_metrics(read_metrics(tmp_path / name / "metrics.jsonl"), small_reference, 5)


def test_abandoned_step_saves_the_state_before_it(tmp_path, small_reference):
    """A stop request during step 4's generation (step 3 completed, last saved step 2): the state as
    of step 3 is saved from the start of step 4 (data position and RNG states included)."""
    from faults import signal_at

    e = _interrupt(tmp_path, "abandon", faults=signal_at("generate", 4, signal.SIGTERM))
    assert e.step == 3 and e.checkpoint == tmp_path / "abandon" / "step-00000003"
    assert [r["step"] for r in read_metrics(tmp_path / "abandon" / "metrics.jsonl")] == [1, 2, 3]
    run_grpo(_config(tmp_path, *SMALL, name="abandon"), progress=False)
    assert_same_metrics(read_metrics(tmp_path / "abandon" / "metrics.jsonl"), small_reference, 5)


def test_second_signal_stops_at_once(tmp_path):
    """Ctrl-C twice: the second one is a plain KeyboardInterrupt raised where the run is; the
    checkpoints on disk are the complete ones from before."""
    from faults import signal_at

    trainer = GRPOTrainer(_config(tmp_path, *SMALL, name="twice"), progress=False,
                          faults=signal_at("generate", 3, signal.SIGINT, times=2))
    try:
        with pytest.raises(KeyboardInterrupt) as ei:
            trainer.train()
        assert not isinstance(ei.value, TrainingInterrupted)
    finally:
        trainer.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert find_latest_valid(tmp_path / "twice") == (tmp_path / "twice" / "step-00000002", [])


def test_no_signal_handling_when_asked(tmp_path):
    trainer = GRPOTrainer(_config(tmp_path, "run.max_steps=1", "data.prompts_per_step=2",
                                  "generation.num_generations=2", name="plain"), progress=False,
                          handle_signals=False, on_step=lambda s, r: seen.append(signal.getsignal(signal.SIGTERM)))
    seen: list = []
    try:
        trainer.train()
    finally:
        trainer.close()
    assert seen == [signal.SIG_DFL]


# ------------------------------------------------------------------------- resume=auto fallback


def test_resume_auto_skips_bad_checkpoints_and_deletes_nothing(tmp_path, caplog):
    """Newest first: a truncated state file and an unreadable meta.json are skipped with one
    warning each, the run resumes from the newest that verifies, and nothing on disk changes. An
    explicit run.resume naming a bad one is an error; when none verifies, so is auto."""
    small = ("data.prompts_per_step=2", "generation.num_generations=2", "run.save_every=1", "run.keep_last=5")
    run_grpo(_config(tmp_path, "run.max_steps=4", *small), progress=False)
    run = tmp_path / "run"
    state = run / "step-00000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    (run / "step-00000003" / "meta.json").write_text("{not json")
    files_before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with caplog.at_level("WARNING", logger="compilepass.standby.grpo.trainer"):
        trainer = GRPOTrainer(_config(tmp_path, "run.max_steps=5", *small), progress=False)
    try:
        assert trainer.resumed_from == run / "step-00000002" and trainer.step == 2
    finally:
        trainer.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "compilepass.standby.grpo.trainer"]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings), warnings
    assert warnings[0].startswith(f"skipping checkpoint {run / 'step-00000004'}: trainer_state.pt is 1000 bytes")
    assert warnings[1].startswith(f"skipping checkpoint {run / 'step-00000003'}: meta.json is unreadable (JSONDecodeError")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files_before

    with pytest.raises(CheckpointError, match=r"step-00000004 is unusable: trainer_state.pt is 1000 bytes") as ei:
        GRPOTrainer(_config(tmp_path, "run.max_steps=5", *small, f"run.resume={run / 'step-00000004'}"))
    assert "\n" not in str(ei.value)
    for name in ("step-00000001", "step-00000002"):
        (run / name / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies .*step-00000004: trainer_state.pt"):
        GRPOTrainer(_config(tmp_path, "run.max_steps=5", *small))


# ---------------------------------------------------------------------- per-step lines and names


def test_per_step_lines_and_resume_line(tmp_path, capsys):
    """stderr not a terminal (here: captured), progress "auto": one flushed line per logged step
    with step, reward, loss, step time and tokens/s; a resumed run says where it resumed from.
    progress=False prints nothing."""
    small = ("data.prompts_per_step=2", "generation.num_generations=2", "run.log_every=2")
    run_grpo(_config(tmp_path, "run.max_steps=3", *small), progress="auto")
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split("  ")[0] for ln in lines] == ["grpo: step 2/3", "grpo: step 3/3"], lines
    parts = lines[0].split("  ")
    assert parts[1].startswith("reward ") and parts[2].startswith("loss ") and parts[3].endswith(" s")
    assert parts[4].endswith(" tok/s") and len(parts) == 5, lines
    run_grpo(_config(tmp_path, "run.max_steps=4", *small), progress="lines")
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert capsys.readouterr().err.splitlines() == [
        f"grpo: resumed from {tmp_path / 'run' / 'step-00000003'} (step 3)", ProgressBar.format_line(4, 4, last)]


def test_progress_off_and_bad_progress_value(tmp_path, capsys):
    run_grpo(_config(tmp_path, "run.max_steps=1", "data.prompts_per_step=2", "generation.num_generations=2"),
             progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match="progress must be true, false, 'auto' or 'lines'"):
        GRPOTrainer(_config(tmp_path, "run.max_steps=2", name="other"), progress="bar")


def test_reward_metrics_are_named_by_function(tmp_path):
    """Two user files with a function of the same name, by path: rewards/contains_answer and
    rewards/contains_answer_2 (in listed order) beside the built-in's rewards/repeat_letter."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "myrewards.py").write_text(
            "def contains_answer(prompts, completions, answers, **kw):\n"
            f"    return [{1.0 if d == 'a' else 0.5}] * len(completions)\n")
    fns = f"[repeat_letter, '{tmp_path / 'a' / 'myrewards.py'}:contains_answer', " \
          f"'{tmp_path / 'b' / 'myrewards.py'}:contains_answer']"
    summary = run_grpo(_config(tmp_path, "run.max_steps=1", "data.prompts_per_step=2", "generation.num_generations=2",
                               f"reward.functions={fns}"), progress=False)
    rec = summary.metrics[0]
    assert sorted(k for k in rec if k.startswith("rewards/") and k.endswith("/mean")) == [
        "rewards/contains_answer/mean", "rewards/contains_answer_2/mean", "rewards/repeat_letter/mean"]
    assert rec["rewards/contains_answer/mean"] == 1.0 and rec["rewards/contains_answer_2/mean"] == 0.5


# --------------------------------------------------------------------------- bad counts and sizes


GRPO_COUNTS = [
    ("model.lora_rank", 0), ("model.lora_rank", -1), ("model.mlp_chunk_tokens", -1),
    ("generation.num_generations", 0), ("generation.num_generations", -2), ("generation.max_prompt_len", 0),
    ("generation.max_completion_len", 0), ("generation.max_completion_len", -5), ("generation.top_k", -1),
    ("generation.stop_token_ids", [-1]), ("loss.num_iterations", 0), ("optim.micro_batch_size", -1),
    ("optim.warmup_steps", -1), ("data.prompts_per_step", 0), ("data.prompts_per_step", -3),
    ("data.builtin_size", 0), ("run.max_steps", 0), ("run.max_steps", -1), ("run.log_every", 0),
    ("run.save_every", -1), ("run.keep_last", 0), ("run.seed", -1), ("data.seed", -1),
]


@pytest.mark.parametrize("key, value", GRPO_COUNTS, ids=[f"{k}={v}" for k, v in GRPO_COUNTS])
def test_grpo_bad_counts_cli_and_python(tmp_path, capsys, key, value):
    """The same key-naming line from the command (exit 2, before any work) and from the Python
    API with a config built from dataclasses."""
    import dataclasses

    text = str(value).replace(" ", "")
    rc = cli.main(["grpo", "--preset", "tiny", f"run.output_dir={tmp_path / 'x'}", f"{key}={text}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"compilepass: error: '{key}' must be"), err
    section, name = key.split(".")
    cfg = GRPOConfig()
    setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **{name: value}))
    with pytest.raises(ConfigError, match=f"^'{key}' must be"):
        GRPOTrainer(cfg)
    assert not (tmp_path / "x").exists()


def test_grpo_python_api_checks_types():
    """A config built in Python gets the loaders' type checks (not a TypeError deep in a step)."""
    with pytest.raises(ConfigError, match=r"'run.max_steps' must be an integer \(got 2.5\)"):
        GRPOConfig(run=RunConfig(max_steps=2.5)).validate()
    with pytest.raises(ConfigError, match=r"'generation.num_generations' must be an integer \(got '8'\)"):
        GRPOConfig(generation=GenerationConfig(num_generations="8")).validate()
    with pytest.raises(ConfigError, match=r"'model.lora_rank' must be an integer \(got True\)"):
        GRPOConfig(model=ModelConfig(lora_rank=True)).validate()
    with pytest.raises(ConfigError, match="'model' must be a ModelConfig"):
        GRPOConfig(model={"lora_rank": 4}).validate()
    with pytest.raises(ConfigError, match=r"'optim.lr' must be a finite number \(got inf\)"):
        GRPOConfig(optim=OptimConfig(lr=float("inf"))).validate()
    c = GRPOConfig(model=ModelConfig(lora_alpha=16)).validate()
    assert c.model.lora_alpha == 16.0 and isinstance(c.model.lora_alpha, float)


BENCH_COUNTS = [
    (["--min-len", "0"], "--min-len must be >= 1 (got 0)", {"min_len": 0}),
    (["--min-len", "-4"], "--min-len must be >= 1 (got -4)", {"min_len": -4}),
    (["--max-len", "0"], "--max-len must be >= 1 (got 0)", {"max_len": 0}),
    (["--min-len", "8", "--max-len", "4"], "need 1 <= --min-len <= --max-len (got 8, 4)", {"min_len": 8, "max_len": 4}),
    (["--resolution", "0"], "--resolution must be >= 1 (got 0)", {"resolution": 0}),
    (["--resolution", "-3"], "--resolution must be >= 1 (got -3)", {"resolution": -3}),
    (["--generations", "1"], "--generations must be >= 2", {"generations": 1}),
    (["--generations", "0"], "--generations must be >= 2", {"generations": 0}),
    (["--lora-rank", "0"], "--lora-rank must be >= 1 (got 0)", {"lora_rank": 0}),
    (["--lora-rank", "-8"], "--lora-rank must be >= 1 (got -8)", {"lora_rank": -8}),
    (["--prompt-len", "0"], "--prompt-len must be >= 1 (got 0)", {"prompt_len": 0}),
    (["--generate-tokens", "0"], "--generate-tokens must be >= 1 (got 0)", {"generate_tokens": 0}),
    (["--mlp-chunk-tokens", "-1"], "--mlp-chunk-tokens must be >= 0", {"mlp_chunk_tokens": -1}),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1 (got 0)", {"micro_batch_size": 0}),
]


@pytest.mark.parametrize("argv, needle, kwargs", BENCH_COUNTS, ids=[" ".join(a) for a, _, _ in BENCH_COUNTS])
def test_bench_context_bad_counts_cli_and_python(capsys, argv, needle, kwargs):
    """Checked before the CUDA check and before any model is built: the same line either way."""
    from compilepass.standby.bench.context import max_context

    rc = cli.main(["bench", "context", "--model", "tiny", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("compilepass: error: ") and needle in err[0], err
    with pytest.raises(CompilepassError) as ei:
        max_context("tiny", allow_cpu=True, **kwargs)
    assert needle in str(ei.value)
    with pytest.raises(CompilepassError, match="must be an integer"):
        max_context("tiny", allow_cpu=True, lora_rank=2.0)


def test_bench_context_unknown_engine_is_one_line():
    from compilepass.standby.bench.context import max_context

    with pytest.raises(CompilepassError, match="--engine must be one of native, vllm"):
        max_context("tiny", allow_cpu=True, engine="sglang")


def test_bench_context_vllm_on_cuda_searches_one_length_per_process():
    """vLLM allows one sleep-mode engine per process and each trial builds one: on CUDA a search over
    several lengths is refused in one line, before any model is built (checked here without a GPU)."""
    from compilepass.standby.bench.context import max_context

    with pytest.raises(CompilepassError, match="one length per process.*--min-len equal to --max-len"):
        max_context("tiny", device="cuda", engine="vllm", min_len=4, max_len=8)

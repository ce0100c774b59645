"""run.report_to: TensorBoard for real (event files read back), wandb offline and trackio when
installed (their local records read back), a one-line error when a tracker's package is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from compilepass.core.errors import ConfigError
from compilepass.standby.grpo.config import default_config, load_config
from compilepass.standby.grpo.metrics import MetricsLogger, read_metrics
from compilepass.standby.grpo.trackers import TRACKERS, check_report_to
from compilepass.standby.grpo.trainer import run_grpo

RECORDS = [{"reward": 0.25, "completions/mean_length": 3.0, "rewards/f/mean": 0.5},
           {"reward": 0.75, "completions/mean_length": 5.0, "rewards/f/mean": 1.0}]


def test_report_to_names():
    assert check_report_to("none") == [] and check_report_to([]) == [] and check_report_to(["none"]) == []
    with pytest.raises(ConfigError, match=r"^'run.report_to' names an unknown tracker 'mlflow'; valid: "
                                          r"tensorboard, wandb, trackio, none, all$"):
        check_report_to(["mlflow"])
    with pytest.raises(ConfigError, match="run.report_to"):
        load_config(None, ["run.report_to=[bogus]"])
    installed = [n for n, pkg in TRACKERS.items() if importlib.util.find_spec(pkg) is not None]
    assert check_report_to("all") == installed


@pytest.mark.parametrize("name", list(TRACKERS))
def test_each_tracker_is_checked_against_its_package(name):
    """Installed: accepted (alone, comma-separated or listed); missing: one line saying what to install."""
    if importlib.util.find_spec(TRACKERS[name]) is not None:
        assert check_report_to(name) == [name] and check_report_to(f"none,{name}") == [name]
        assert load_config(None, [f"run.report_to={name}"]).run.report_to == [name]
    else:
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"run.report_to=[{name}]"])
        assert "\n" not in str(e.value) and f"pip install {TRACKERS[name]}" in str(e.value)


def test_logging_steps_is_trls_name_for_log_every():
    assert load_config(None, ["run.logging_steps=5"]).run.log_every == 5
    assert load_config(None, ["run.log_every=3"]).run.log_every == 3
    with pytest.raises(ConfigError, match="'run.logging_steps' must be >= 1 or null"):
        load_config(None, ["run.logging_steps=0"])


def test_tensorboard_gets_the_metrics_of_a_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", "run.max_steps=3", "run.report_to=tensorboard",
                             "run.logging_steps=2",
                             "data.prompts_per_step=2", "generation.num_generations=2",
                             "generation.max_completion_len=4"], base=default_config("tiny"))
    run_grpo(cfg, progress=False)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("reward", "reward_std", "rewards/repeat_letter/mean", "frac_reward_zero_std", "loss", "entropy",
                "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean", "learning_rate",
                "grad_norm"):
        assert key in tags, key
        assert [e.step for e in acc.Scalars(key)] == [2, 3]  # every 2nd step and the last
        assert [e.value for e in acc.Scalars(key)] == pytest.approx([r[key] for r in recs], rel=1e-6, abs=1e-7)


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, report_to=["wandb"], run_config={"run": {"max_steps": 2}})
    run = logger._trackers[0]._run
    assert run.offline
    for step, rec in enumerate(RECORDS, 1):
        logger.log(step, rec)
    assert run.summary["reward"] == 0.75 and run.summary["rewards/f/mean"] == 1.0
    logger.close()
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0


def test_trackio_local(tmp_path):
    pytest.importorskip("trackio")
    store = tmp_path / "trackio"
    code = textwrap.dedent(f"""
        from compilepass.standby.grpo.metrics import MetricsLogger
        logger = MetricsLogger({str(tmp_path / 'run')!r}, report_to=["trackio"])
        for step, rec in enumerate({RECORDS!r}, 1):
            logger.log(step, rec)
        logger.close()
    """)
    env = {**os.environ, "TRACKIO_DIR": str(store)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=120)
    with sqlite3.connect(store / "compilepass.db") as db:
        rows = db.execute("select step, metrics from metrics where run_name = 'run' order by step").fetchall()
    assert [s for s, _ in rows] == [1, 2]
    assert [json.loads(m)["reward"] for _, m in rows] == [0.25, 0.75]

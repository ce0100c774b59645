"""The learning-rate schedule is transformers.get_scheduler's: the same LRs step by step for every
name we offer, a plain-data state that round-trips through our checkpoints, and a run killed with
SIGKILL that resumes on the same LRs (CPU, real transformers, real processes)."""

from __future__ import annotations

import subprocess

import pytest
import torch
from faults import cli_with_fault
from test_grpo import _env
from transformers import get_scheduler

from compilepass import cli
from compilepass.core.errors import ConfigError
from compilepass.core.models import add_lora, build_model
from compilepass.standby.grpo.checkpoint import load_checkpoint, save_checkpoint
from compilepass.standby.grpo.config import load_config
from compilepass.standby.grpo.lr_schedule import SCHEDULERS
from compilepass.standby.grpo.metrics import read_metrics

LR = 0.1


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


def _transformers_lrs(name: str, warmup: int, total: int, steps: int, lr: float = LR, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    return _lrs(get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=kwargs or None), opt, steps)


KWARGS = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "cosine_warmup_with_min_lr": {"min_lr": 0.01},
          "cosine_with_restarts": {"num_cycles": 2}, "polynomial": {"power": 2.0, "lr_end": 1e-3},
          "warmup_stable_decay": {"num_decay_steps": 4}}


@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_schedule_is_transformers(name, warmup):
    kwargs = KWARGS.get(name, {})
    c = load_config(None, [f"optim.scheduler={name}", f"optim.warmup_steps={warmup}", f"optim.lr={LR}",
                           f"optim.scheduler_kwargs={kwargs}"])
    opt = c.optim.make_optimizer([torch.nn.Parameter(torch.zeros(2))])
    ours = _lrs(c.optim.make_scheduler(opt, max_steps=12), opt, 14)
    # our "constant" keeps its warmup: transformers' constant_with_warmup (its "constant" has none)
    theirs = _transformers_lrs("constant_with_warmup" if name == "constant" else name, warmup, 12, 14, **kwargs)
    assert ours == theirs
    if warmup and name in ("constant", "linear", "cosine"):
        assert ours[0] == 0.0 and ours[warmup] == pytest.approx(LR)  # linear warmup from 0


def test_bad_scheduler_options_are_one_line():
    c = load_config(None, ["optim.scheduler=cosine_with_min_lr"])
    opt = c.optim.make_optimizer([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ConfigError) as e:
        c.optim.make_scheduler(opt, max_steps=10)
    assert str(e.value).startswith("'optim.scheduler_kwargs' {} do not fit optim.scheduler 'cosine_with_min_lr'")
    assert "min_lr" in str(e.value) and "\n" not in str(e.value)
    c = load_config(None, ["optim.scheduler=cosine", "optim.scheduler_kwargs={nope: 1}"])
    with pytest.raises(ConfigError, match=r"'optim.scheduler_kwargs' \{'nope': 1\} do not fit"):
        c.optim.make_scheduler(opt, max_steps=10)
    with pytest.raises(ConfigError, match="'optim.scheduler' must be one of constant, cosine, linear, "
                                          "constant_with_warmup"):
        load_config(None, ["optim.scheduler=reduce_lr_on_plateau"])


def test_scheduler_state_round_trips_through_a_checkpoint(tmp_path):
    """Save at step 4 of a cosine-with-min-lr schedule (warmup 3, 10 steps); a fresh optimizer and
    scheduler loaded from the checkpoint (torch.load weights_only) continue on the same LRs."""
    c = load_config(None, ["optim.scheduler=cosine_with_min_lr", "optim.scheduler_kwargs={min_lr_rate: 0.1}",
                           "optim.warmup_steps=3", f"optim.lr={LR}"])

    def make():
        model = add_lora(build_model("tiny", dtype=torch.float32, seed=0), rank=2, alpha=4, seed=0)
        opt = c.optim.make_optimizer([p for p in model.parameters() if p.requires_grad])
        return model, opt, c.optim.make_scheduler(opt, max_steps=10)

    model, opt, sched = make()
    first = _lrs(sched, opt, 4)
    save_checkpoint(tmp_path, 4, model=model, optimizer=opt, scheduler=sched, config_dict=c.to_dict())
    rest = _lrs(sched, opt, 6)[1:]
    model2, opt2, sched2 = make()
    load_checkpoint(tmp_path, model2, opt2, sched2)
    assert sched2.last_epoch == 4 and opt2.param_groups[0]["lr"] == first[-1]
    assert _lrs(sched2, opt2, 6)[1:] == rest
    assert first + rest == _transformers_lrs("cosine_with_min_lr", 3, 10, 10, min_lr_rate=0.1)


STEPS = 6
FLAGS = ["grpo", "--preset", "tiny", "--no-progress", "--max_steps", str(STEPS), "--save_steps", "2",
         "--lr_scheduler_type", "cosine", "--warmup_steps", "2", "--learning_rate", "2e-3",
         "data.prompts_per_step=2", "generation.num_generations=4", "generation.max_completion_len=4"]


def test_sigkill_then_resume_continues_the_same_lrs(tmp_path, capsys):
    """`compilepass grpo` with TRL-style schedule flags, killed with SIGKILL at the start of step 5
    (last checkpoint: step 4) and run again (in this process): the LRs of steps 1..6 are
    transformers' cosine."""
    out = tmp_path / "run"
    args = FLAGS + [f"run.output_dir={out}"]
    killed = subprocess.run(cli_with_fault('faults.kill_at("generate", 5)') + args, env=_env(), capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert cli.main(args) == 0
    assert f"grpo: resumed from {out / 'step-00000004'} (step 4)" in capsys.readouterr().err
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    # the LR logged after step k is the one step k + 1 runs at: transformers' after k scheduler steps
    assert [r["learning_rate"] for r in recs] == _transformers_lrs("cosine", 2, STEPS, STEPS, lr=2e-3)[1:]

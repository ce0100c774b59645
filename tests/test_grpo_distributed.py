"""Data-parallel `compilepass grpo` under torchrun: 2 real CPU processes on the gloo backend.

- A 2-rank run's first step (loss, metrics, updated LoRA weights in its checkpoint) equals a
  1-rank run over the same global batch. The completions are the same by construction:
  ``generation.group_seeds=true`` samples each prompt group in its own engine call seeded by the
  group's global index, so 1 rank and 2 ranks draw the very same tokens; what differs is only the
  split of the batch, which the gradient all-reduce and the global token count must undo.
- kill -9 of one rank mid-run leaves a checkpoint that verifies, and a 1-rank run resumes from it
  and ends where an uninterrupted 1-rank run ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_grpo import _cli, _env

from compilepass import cli
from compilepass.core.errors import ConfigError
from compilepass.standby.grpo.checkpoint import ADAPTER_FILE, find_latest_valid, verify_checkpoint
from compilepass.standby.grpo.distributed import DistContext, group_seed, rank_seed
from compilepass.standby.grpo.metrics import read_metrics

COMMON = ["grpo", "--preset", "tiny", "--no-progress", "data.prompts_per_step=4", "generation.num_generations=4",
          "generation.group_seeds=true"]
#: Metrics that must agree between 1 and 2 ranks (timings, throughput and memory are per machine;
#: the batch's reward means and stds are pooled exactly over the ranks).
SAME = ("reward", "reward_std", "rewards/repeat_letter/mean", "rewards/repeat_letter/std", "frac_reward_zero_std",
        "loss", "kl", "completions/mean_length",
        "completions/min_length", "completions/max_length", "grad_norm", "clip_ratio/region_mean", "learning_rate")


def _torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "compilepass.cli", *args]


def _env1():
    return _env(OMP_NUM_THREADS="1")  # what torchrun gives each rank: the 1-rank run's threads alike


def _assert_same(a: dict, b: dict) -> None:
    for key in SAME:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key, a[key], b[key])


def _adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / ADAPTER_FILE))


# ------------------------------------------------------------------------------------------ unit


def test_shares_seeds_and_batch_check():
    one, two = DistContext(), DistContext(rank=1, world_size=2)
    assert one.shard(list("abcd")) == list("abcd") and two.shard(list("abcd")) == ["c", "d"]
    assert DistContext(rank=0, world_size=2).shard(list("abcd")) == ["a", "b"]
    assert two.first_group(4) == 2 and one.first_group(4) == 0
    assert rank_seed(123, 0) == 123 and rank_seed(123, 1) != rank_seed(123, 2) != 123
    assert len({group_seed(0, s, g) for s in range(1, 4) for g in range(4)}) == 12
    with pytest.raises(ConfigError, match=r"data.prompts_per_step \(4\) must be a multiple of the number of ranks \(3\)"):
        DistContext(rank=0, world_size=3).check_batch(4)
    DistContext(rank=0, world_size=2).check_engine("native")
    with pytest.raises(ConfigError, match="generation.engine=vllm is not supported under torchrun"):
        DistContext(rank=0, world_size=2).check_engine("vllm")
    one.check_engine("vllm")  # one rank: whatever the engine
    n = torch.tensor(7)
    assert one.token_count(n) is n  # one rank: the identity, nothing reduced
    rec = {"reward": 0.5, "step_s": 1.0}
    assert one.reduce_metrics(rec) is rec


# --------------------------------------------------------------------------------- 2 ranks vs 1


@pytest.mark.parametrize("loss_type", ["grpo", pytest.param("bnpo", marks=pytest.mark.slow)])
def test_two_ranks_first_step_equals_one_rank(tmp_path, loss_type):
    """Step 1 of 2 ranks x 2 prompts = step 1 of 1 rank x 4 prompts: metrics and updated LoRA weights.
    bnpo divides by the batch's token count, so it needs the global count, not each rank's."""
    # many stop ids: completions of 1..8 tokens, so the ranks' token counts differ (bnpo's divisor)
    stops = ",".join(str(t) for t in range(100, 201))
    # Adam's first update is lr * g / (|g| + eps): at eps=1e-8 an element whose gradient is near 0
    # is ill-conditioned (the two runs' summation orders differ by an ulp, which moved one element
    # by 1.7e-6 of lr=2e-3 here). eps=1e-3 keeps the update a smooth function of the gradient, so
    # equal updates still mean equal gradients.
    args = COMMON + ["run.max_steps=1", f"loss.loss_type={loss_type}", "loss.beta=0.04", "optim.eps=1e-3",
                     f"generation.stop_token_ids=[{stops}]"]
    two, one = tmp_path / "two", tmp_path / "one"
    r2 = subprocess.run(_torchrun(args + [f"run.output_dir={two}"]), env=_env(), capture_output=True, text=True,
                        cwd=tmp_path, timeout=240)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = subprocess.run(_cli(args + [f"run.output_dir={one}"]), env=_env1(), capture_output=True, text=True,
                        cwd=tmp_path, timeout=240)
    assert r1.returncode == 0, r1.stderr[-3000:]

    m2, m1 = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert [r["step"] for r in m2] == [1] == [r["step"] for r in m1]  # written once (rank 0)
    _assert_same(m2[0], m1[0])
    assert m1[0]["kl"] == 0.0 and m1[0]["grad_norm"] > 0  # the first step: policy = reference
    assert 1 < m1[0]["completions/mean_length"] < 7  # lengths vary: token-normalized losses see different counts
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("step-")) == ["step-00000001"]
    verify_checkpoint(two / "step-00000001")
    w2, w1 = _adapter(two / "step-00000001"), _adapter(one / "step-00000001")
    assert w2.keys() == w1.keys() and w1
    moved = 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-7, msg=k)
        moved += int(not torch.equal(w1[k], torch.zeros_like(w1[k])))
    assert moved  # the update reached the weights (LoRA B starts at zero)


def test_prompts_per_step_must_split_evenly(tmp_path, capsys, monkeypatch):
    """As rank 0 of 2 would see it: one line, exit 2, before any connection to the other ranks."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc = cli.main(["grpo", "--preset", "tiny", "data.prompts_per_step=3", f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["compilepass: error: data.prompts_per_step (3) must be a multiple of the number of ranks (2): each rank "
                   "takes an equal share of whole prompt groups"], err
    assert not torch.distributed.is_initialized()


# ------------------------------------------------------------------------------ kill -9 and resume


def _rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the processes under ``parent`` (torchrun) whose environment names a RANK."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid != parent:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(d.name)
    return out


@pytest.mark.slow
def test_kill9_one_rank_then_resume_on_one_rank(tmp_path):
    steps = 6
    args = COMMON + [f"run.max_steps={steps}", "run.save_every=1", "run.keep_last=3"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(args + [f"run.output_dir={killed}"]), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.time() + 240
    while not (killed / "step-00000002").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    ranks = _rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    try:
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0  # torchrun reports the failed rank and ends the other
    latest, skipped = find_latest_valid(killed)
    assert latest is not None, skipped
    verify_checkpoint(latest)
    k = int(latest.name.split("-")[1])
    assert 2 <= k < steps, k

    resumed = subprocess.run(_cli(args + [f"run.output_dir={killed}"]), env=_env1(), capture_output=True,
                             text=True, cwd=tmp_path, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"grpo: resumed from {latest} (step {k})" in resumed.stderr.splitlines(), resumed.stderr[-3000:]
    full = tmp_path / "full"
    ref = subprocess.run(_cli(args + [f"run.output_dir={full}"]), env=_env1(), capture_output=True, text=True,
                         cwd=tmp_path, timeout=240)
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = read_metrics(killed / "metrics.jsonl"), read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in a] == list(range(1, steps + 1)) == [r["step"] for r in b]
    for ra, rb in zip(a, b):  # steps 1..k on 2 ranks, k+1.. on 1: the same run as 1 rank throughout
        _assert_same(ra, rb)

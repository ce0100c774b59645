"""The standby GRPO loop (CPU): learning, exact resume after SIGKILL, reward / config / OOM errors,
and the `bench context` smoke run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import cli_with_fault, oom_in, oom_over_rows

from compilepass import cli
from compilepass.standby.grpo.config import default_config, load_config
from compilepass.standby.grpo.metrics import read_metrics
from compilepass.standby.grpo.trainer import GRPOTrainer, TrainingOutOfMemoryError, run_grpo, step_seed
from compilepass.standby.training.loss import group_advantages

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("reward", "reward_std", "rewards/repeat_letter/mean", "loss", "kl", "entropy", "frac_reward_zero_std",
            "completions/mean_length", "grad_norm", "learning_rate")


def _config(tmp_path, *overrides, name="run"):
    return load_config(None, [f"run.output_dir={tmp_path / name}", *overrides], base=default_config("tiny"))


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _cli(args):
    return [sys.executable, "-m", "compilepass.cli", *args]


# ------------------------------------------------------------------------------------- unit


def test_group_advantages_and_zero_std():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0])
    adv, zero = group_advantages(r, 3, scale=True)
    assert zero == 1
    assert torch.allclose(adv[:3], torch.zeros(3))
    assert torch.allclose(adv[3:], torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-4))
    adv, _ = group_advantages(r, 3, scale=False)
    assert torch.allclose(adv[3:], torch.tensor([-1.0, 0.0, 1.0]))
    assert step_seed(0, 1) != step_seed(0, 2) and step_seed(0, 1) == step_seed(0, 1)


# ------------------------------------------------------------------------------------ (a) learning


def test_tiny_preset_learns_repeat(tmp_path):
    """The built-in tiny config with a fixed seed at least doubles its reward. Its first 30 steps
    (of 50; the schedule is constant, so they are the same steps) keep the test near a minute:
    measured first-5 mean 0.147, last-5 (steps 26-30) 0.749; at 50 steps 0.742."""
    t0 = time.perf_counter()
    summary = run_grpo(_config(tmp_path, "run.max_steps=30"), progress=False)
    wall = time.perf_counter() - t0
    rewards = summary.reward_means()
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"learning: first-5 mean {first:.3f}, last-5 mean {last:.3f}, {wall:.1f}s")
    assert last >= 2 * first, (first, last, rewards)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 31))
    for key in ("reward", "reward_std", "rewards/repeat_letter/mean", "rewards/repeat_letter/std",
                "frac_reward_zero_std", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "loss", "grad_norm", "learning_rate", "completions/mean_length",
                "completions/min_length", "completions/max_length", "completions/clipped_ratio",
                "completions/mean_terminated_length", "tokens_per_s", "step_s", "peak_mem_gib"):
        assert key in recs[-1], key
    assert (tmp_path / "run" / "step-00000030").is_dir()


# ------------------------------------------------------------------------------ (b) kill -9 resume


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    steps = 14
    common = ["grpo", "--preset", "tiny", "--no-progress", f"run.max_steps={steps}", "run.save_every=1",
              "run.keep_last=2", "data.prompts_per_step=4", "generation.num_generations=4"]
    killed = tmp_path / "killed"
    cmd = _cli(common + [f"run.output_dir={killed}"])
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.time() + 240
    target = killed / "step-00000003"
    while not target.is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from compilepass.standby.grpo.checkpoint import find_latest

    k = int(find_latest(killed).name.split("-")[1])
    assert 3 <= k < steps, k
    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    full = tmp_path / "full"
    ref = subprocess.run(_cli(common + [f"run.output_dir={full}"]), env=_env(), capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert ref.returncode == 0, ref.stderr

    assert_same_metrics(read_metrics(killed / "metrics.jsonl"), read_metrics(full / "metrics.jsonl"), steps)
    print(f"resume: killed after step {k}, steps {k + 1}..{steps} match")


def assert_same_metrics(a: list[dict], b: list[dict], steps: int) -> None:
    """Two runs' metrics.jsonl records: steps 1..steps each exactly once, the COMPARED keys equal."""
    assert [r["step"] for r in a] == list(range(1, steps + 1))
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        for key in COMPARED:
            assert ra[key] == pytest.approx(rb[key], abs=1e-6, rel=1e-6), (ra["step"], key)


# ------------------------------------------------------------------------------- (c) reward error


def test_reward_error_names_sample_and_saves_state(tmp_path):
    from compilepass.standby.grpo.data import PromptBatcher, load_dataset

    cfg = default_config("tiny")
    batch = PromptBatcher(load_dataset(cfg.data.dataset, seed=cfg.data.seed, builtin_size=cfg.data.builtin_size),
                          cfg.data.prompts_per_step, shuffle=True, seed=cfg.data.seed).next_batch()
    bad = batch[0].prompt
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "my_rewards.py").write_text(
        "def picky(prompts, completions, answers, **kw):\n"
        f"    if any(p == {bad!r} for p in prompts):\n"
        "        raise ValueError('cannot score this one')\n"
        "    return [0.0] * len(completions)\n")
    out = tmp_path / "run"
    r = subprocess.run(_cli(["grpo", "--preset", "tiny", "--no-progress", f"run.output_dir={out}", "run.max_steps=3",
                             "reward.functions=[repeat_letter, 'my_rewards:picky']"]),
                       env=_env(PYTHONPATH=os.pathsep.join([str(mod), str(REPO)])), capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("compilepass: error:")]
    assert len(lines) == 1, r.stderr
    assert "'my_rewards:picky'" in lines[0] and "sample 0" in lines[0] and "Repeat the letter" in lines[0]
    assert "ValueError: cannot score this one" in lines[0]
    assert "Traceback" not in r.stderr
    assert (out / "step-00000000").is_dir()  # the state as of the start of step 1


# ------------------------------------------------------------------------------ (d) config errors


@pytest.mark.parametrize("args, expect", [
    (["--preset", "tiny", "generation.num_generations=1"], "generation.num_generations"),
    (["--preset", "tiny", "optim.learning_rate=1"], "unknown key 'optim.learning_rate'"),
    (["--preset", "tiny", "lr=1"], "section.key=value"),
    (["--config", "does/not/exist.yaml"], "not found"),
    ([], "--config FILE or --preset"),
    (["--preset", "huge"], "unknown default config"),
])
def test_config_errors_one_line_exit_2(tmp_path, capsys, args, expect):
    rc = cli.main(["grpo", *args, f"run.output_dir={tmp_path / 'x'}"] if args else ["grpo"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("compilepass: error:") and expect in err[0], err


def test_config_file_error_one_line(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("model: {name_or_path: tiny}\nloss: {loss_type: ppo}\n")
    rc = cli.main(["grpo", "--config", str(f)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "loss.loss_type" in err[0], err


def test_resume_refuses_changed_config(tmp_path):
    run_grpo(_config(tmp_path, "run.max_steps=1", "data.prompts_per_step=2", "generation.num_generations=2"),
             progress=False)
    from compilepass.core.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.lr"):
        GRPOTrainer(_config(tmp_path, "run.max_steps=2", "data.prompts_per_step=2", "generation.num_generations=2",
                            "optim.lr=0.1"))


# ------------------------------------------------------------------------------------ (e) OOM


def test_oom_in_training_saves_state_and_explains(tmp_path):
    cfg = _config(tmp_path, "run.max_steps=3", "run.save_every=0", "data.prompts_per_step=2",
                  "generation.num_generations=2")
    with pytest.raises(TrainingOutOfMemoryError) as ei:
        run_grpo(cfg, progress=False, faults=oom_in("train", 2))
    msg = str(ei.value)
    assert "training at step 2" in msg and "1.50 GiB" in msg and "peak" in msg
    assert "max_completion_len" in msg and "prompts_per_step" in msg and "gradient_checkpointing" in msg
    assert (tmp_path / "run" / "step-00000001").is_dir()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]


def _one_step(tmp_path, name, *overrides, faults=None):
    trainer = GRPOTrainer(_config(tmp_path, "run.max_steps=1", "data.prompts_per_step=2", "generation.num_generations=4",
                                  "optim.lr=0.01", *overrides, name=name), progress=False, faults=faults)
    try:
        rec = trainer.train_step(1)
        lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return rec, lora, trainer.micro_batch.fit_tokens
    finally:
        trainer.close()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_equal_the_whole_batch(tmp_path, loss_type):
    """Gradient accumulation over micro-batches (3 + 3 + 2 of 8 sequences; the reference and old
    log-probs too) gives the whole batch's loss, metrics and update."""
    common = (f"loss.loss_type={loss_type}", "loss.beta=0.05", "loss.num_iterations=2")
    whole, w_lora, _ = _one_step(tmp_path, "whole", *common)
    micro, m_lora, _ = _one_step(tmp_path, "micro", *common, "optim.micro_batch_size=3")
    for k in ("loss", "kl", "grad_norm", "clip_ratio/region_mean", "reward", "entropy"):
        assert micro[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-6), k
    for n in w_lora:  # after Adam (lr 0.01): near-zero gradient entries amplify summation-order noise
        torch.testing.assert_close(m_lora[n], w_lora[n], atol=5e-4, rtol=1e-3)


def test_automatic_micro_batch_halves_on_oom(tmp_path, caplog):
    """optim.micro_batch_size=0: a training forward that runs out of memory is retried with half
    the sequences (8 -> 4 -> 2 here) and the step's result is the whole batch's; a fixed size that
    does not fit is the usual out-of-memory error."""
    whole, w_lora, fit = _one_step(tmp_path, "whole", "loss.beta=0.05")
    assert fit is None
    with caplog.at_level("WARNING", logger="compilepass.standby.training.micro_batch"):
        auto, a_lora, fit = _one_step(tmp_path, "auto", "loss.beta=0.05", faults=oom_over_rows(2))
    retries = [r.getMessage() for r in caplog.records if "retrying with" in r.getMessage()]
    assert len(retries) == 2 and "with 8 sequences" in retries[0] and "retrying with 2" in retries[1], retries
    assert fit is not None and fit // 2 >= 1
    assert auto["loss"] == pytest.approx(whole["loss"], rel=1e-4, abs=1e-6)
    assert auto["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    for n in w_lora:
        torch.testing.assert_close(a_lora[n], w_lora[n], atol=5e-4, rtol=1e-3)
    with pytest.raises(TrainingOutOfMemoryError, match="out of memory during training at step 1") as ei:
        _one_step(tmp_path, "fixed", "loss.beta=0.05", "optim.micro_batch_size=4", faults=oom_over_rows(2))
    assert "4 sequence(s) per forward" in str(ei.value) and "lower optim.micro_batch_size (now 4" in str(ei.value)
    # without beta the training forward itself halves (above, the reference pass halved first)
    plain, p_lora, _ = _one_step(tmp_path, "plain-whole")
    caplog.clear()
    with caplog.at_level("WARNING", logger="compilepass.standby.training.micro_batch"):
        train_auto, t_lora, _ = _one_step(tmp_path, "plain-auto", faults=oom_over_rows(2))
    retries = [r.getMessage() for r in caplog.records if "retrying with" in r.getMessage()]
    assert len(retries) == 2 and all(m.startswith("training:") for m in retries), retries
    assert train_auto["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    for n in p_lora:
        torch.testing.assert_close(t_lora[n], p_lora[n], atol=5e-4, rtol=1e-3)
    # the learned size is checkpointed: a resumed run splits its batches as the uninterrupted one
    cfg = _config(tmp_path, "run.max_steps=1", "data.prompts_per_step=2", "generation.num_generations=4", name="ck")
    first = GRPOTrainer(cfg, progress=False, faults=oom_over_rows(2))
    try:
        first.train()
        learned = first.micro_batch.fit_tokens
    finally:
        first.close()
    resumed = GRPOTrainer(_config(tmp_path, "run.max_steps=2", "data.prompts_per_step=2",
                                  "generation.num_generations=4", name="ck"), progress=False)
    try:
        assert learned is not None and resumed.step == 1 and resumed.micro_batch.fit_tokens == learned
        assert resumed.micro_batch.size(8, learned // 2) == 2
    finally:
        resumed.close()
    # not even one sequence fits: the usual error
    with pytest.raises(TrainingOutOfMemoryError, match="1 sequence\\(s\\) per forward"):
        _one_step(tmp_path, "one", "loss.beta=0.05", faults=oom_over_rows(0))


def test_oom_in_generation_cli_one_line(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(cli_with_fault('faults.oom_in("generate")') + [
                        "grpo", "--preset", "tiny", "--no-progress", f"run.output_dir={out}", "run.max_steps=2",
                        "data.prompts_per_step=2", "generation.num_generations=2"],
                       env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("compilepass: error:")]
    assert len(lines) == 1 and "out of memory during generation at step 1" in lines[0], r.stderr
    assert "state saved" in lines[0] and "Traceback" not in r.stderr
    assert (out / "step-00000000").is_dir()


# ------------------------------------------------------------------------------ (f) bench context


def test_bench_context_micro_batches_give_the_whole_group_gradient(monkeypatch):
    """``micro_batch_size=1`` (gradients accumulated per completion) gives the gradient the whole
    group gives in one forward (same seeded completions), read just before clipping, and the same
    update."""
    import torch

    from compilepass.core.models import add_lora, build_model
    from compilepass.standby.bench.context import run_trial

    real_clip = torch.nn.utils.clip_grad_norm_
    seen = []

    def recording_clip(params, *args, **kwargs):
        params = list(params)
        seen.append([p.grad.detach().clone() for p in params])
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)

    def updated(micro):
        model = add_lora(build_model("tiny", dtype=torch.float32, device="cpu", seed=0), rank=4, alpha=8,
                         init_random=True, init_std=0.1, seed=0)
        model.train()
        trial = run_trial(model, 6, generations=4, prompt_len=3, lr=1e-2, micro_batch_size=micro)
        assert trial.ok, trial.error
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, one = updated(None), updated(1)
    assert len(seen) == 2 and any(g.abs().sum() > 0 for g in seen[0])
    for g_whole, g_one in zip(*seen):
        torch.testing.assert_close(g_one, g_whole, rtol=1e-4, atol=1e-7)
    for n in whole:
        torch.testing.assert_close(one[n], whole[n], rtol=1e-5, atol=1e-6)


def test_bench_context_cpu_smoke(tmp_path, capsys):
    from compilepass.standby.bench.context import max_context

    res = max_context("tiny", allow_cpu=True, min_len=4, max_len=8, lora_rank=4)
    assert res.max_completion_len == 8
    assert res.peak_mem_gib is not None and res.peak_mem_gib > 0
    assert [t.completion_len for t in res.trials] == [4, 8] and all(t.ok for t in res.trials)

    out = tmp_path / "ctx.json"
    rc = cli.main(["bench", "context", "--model", "tiny", "--allow-cpu", "--min-len", "4", "--max-len", "4",
                   "--lora-rank", "4", "--standby", "off", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["max_completion_len"] == 4 and data["standby"] is False and data["peak_mem_gib"] > 0


def test_bench_context_partial_generation_and_offload(tmp_path):
    """--generate-tokens K decodes K tokens and trains on all L; --offload-activations runs the
    reentrant-checkpoint path (a no-op offload on CPU); bad K is one clear error."""
    out = tmp_path / "ctx.json"
    rc = cli.main(["bench", "context", "--model", "tiny", "--allow-cpu", "--min-len", "6", "--max-len", "6",
                   "--lora-rank", "4", "--generate-tokens", "2", "--offload-activations", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["complete"] is True and data["command"]
    assert data["generate_tokens"] == 2 and data["offload_activations"] is True
    (trial,) = data["trials"]
    assert trial["ok"] and trial["completion_len"] == 6 and trial["generated_tokens"] == 2
    assert trial["generate_s"] > 0 and trial["train_s"] > 0
    assert cli.main(["bench", "context", "--model", "tiny", "--allow-cpu", "--generate-tokens", "0"]) == 2


def test_bench_context_refuses_cpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    rc = cli.main(["bench", "context", "--model", "tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--allow-cpu" in err[0]


def test_kl_iterations_checkpointing_and_stop_strings(tmp_path):
    """beta > 0 (reference log-probs with the adapter disabled), num_iterations > 1 (old log-probs
    from a no-grad pass), gradient checkpointing, unscaled advantages and a stop string."""
    cfg = _config(tmp_path, "run.max_steps=3", "data.prompts_per_step=2", "generation.num_generations=4",
                  "loss.beta=0.05", "loss.num_iterations=2", "loss.scale_rewards=false",
                  "model.gradient_checkpointing=true", "generation.stop=['a']", "optim.lr=0.01")
    summary = run_grpo(cfg, progress=False)
    recs = summary.metrics
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["kl"] >= 0 for r in recs) and recs[-1]["kl"] > 0  # the adapter moved away from the reference
    assert all(r["completions/max_length"] <= 8 for r in recs)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


def test_policy_logprobs_match_engine(tmp_path):
    """The training-side log-probs (body + selective log-softmax) equal the engine's sampling log-probs."""
    trainer = GRPOTrainer(_config(tmp_path, "run.max_steps=1", "data.prompts_per_step=2",
                                  "generation.num_generations=2", "generation.temperature=0.7"))
    try:
        from compilepass.standby.training.logprobs import policy_logprobs

        prompts = [[72, 105, 33], [65, 66, 67, 68, 69]]
        trainer.engine.wake()
        out = trainer.engine.generate(prompts, max_new_tokens=6, temperature=0.7, seed=3)
        trainer.engine.sleep()
        with torch.no_grad():
            lp = policy_logprobs(trainer.model, prompts, out.completion_ids, out.completion_mask, 0.7, 0)
        torch.testing.assert_close(lp, out.logprobs, atol=1e-4, rtol=1e-4)

        trainer.config.generation.stop = ["ab"]  # cut after the first stop string, stop included
        ids = torch.tensor([list(b"xxabyy"), list(b"zzzzzz")])
        mask = trainer._apply_stop_strings(ids, torch.ones_like(ids))
        assert mask.sum(1).tolist() == [4, 6]
    finally:
        trainer.close()


def test_kv_batch_plan_fits_the_budget_or_says_why():
    """The KV cache is sized from gpu_memory_utilization: all sequences when they fit, else as many
    as fit (the engine generates in chunks), else one clear error naming the need and the budget."""
    from compilepass.core.shapes import PRESETS
    from compilepass.standby.memory import required_bytes
    from compilepass.standby.rollout.kv_plan import KVMemoryError, plan_kv_batch

    shape = PRESETS["qwen3-0.6b"]

    def need(b, max_len=1024):
        dims = (b, shape.num_kv_heads, max_len, shape.head_dim)
        return required_bytes([(f"{k}{i}", torch.bfloat16, dims) for i in range(shape.num_layers) for k in "kv"])

    gib = 2**30
    assert plan_kv_batch(shape, torch.bfloat16, 64, 1024, 80 * gib, 80 * gib, 0.95) == 64
    free = int(need(10) / 0.95) + 1  # room for exactly 10 sequences at 0.95
    fit = plan_kv_batch(shape, torch.bfloat16, 64, 1024, free, 80 * gib, 0.95)
    assert fit == 10 and need(fit) <= free * 0.95 < need(fit + 1)
    # what training keeps across the wake (LoRA grads + optimizer moments) comes off the free memory first
    assert plan_kv_batch(shape, torch.bfloat16, 64, 1024, free + int(need(4) / 0.95), 80 * gib, 0.95,
                         reserve=int(need(4) / 0.95)) == 10
    with pytest.raises(KVMemoryError, match=r"kept for the LoRA gradients"):
        plan_kv_batch(shape, torch.bfloat16, 64, 1024, free, 80 * gib, 0.95, reserve=free)
    with pytest.raises(KVMemoryError, match=r"one sequence of 1024 tokens .* needs .* but .* is available"):
        plan_kv_batch(shape, torch.bfloat16, 64, 1024, need(1) // 2, 80 * gib, 0.95)

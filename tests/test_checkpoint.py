"""GRPO checkpoints (round trip, weights_only, atomicity under SIGKILL, keep-last-K) and the
metrics log (truncation on resume)."""

from __future__ import annotations

import copy
import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from compilepass.core.errors import CompilepassError, ConfigError
from compilepass.core.models import add_lora, build_model
from compilepass.standby.grpo.checkpoint import (CheckpointError, capture_rng_state, cleanup_partial, find_latest,
                                                 find_latest_valid, list_checkpoints, load_checkpoint, restore_rng_state,
                                                 save_checkpoint, verify_checkpoint)
from compilepass.standby.grpo.data import PromptBatcher, load_dataset
from compilepass.standby.grpo.metrics import MetricsLogger, ProgressBar, peak_memory_gib, read_metrics

REPO = Path(__file__).resolve().parents[1]


def make_trainer(seed: int = 0, rank: int = 4):
    """A tiny peft model, AdamW over its LoRA parameters and a LambdaLR warmup schedule."""
    model = add_lora(build_model("tiny", dtype=torch.float32, seed=seed), rank=rank, alpha=2 * rank, seed=seed,
                     init_random=True, init_std=0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    return model, opt, sched


def train_steps(model, opt, sched, n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(3, 256, (2, 6), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_round_trip_restores_weights_optimizer_scheduler_rng_data(tmp_path):
    model, opt, sched = make_trainer()
    train_steps(model, opt, sched, 3)
    batcher = PromptBatcher(load_dataset("builtin:repeat", builtin_size=20), 4, seed=3)
    batcher.next_batch()
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, data_state=batcher.state_dict(),
                           config_dict={"run": {"max_steps": 9}}, metrics_tail=[{"step": 3, "reward": 0.5}],
                           extra={"old_logprobs_seen": torch.tensor([1.0, 2.0])})
    assert path == tmp_path / "step-00000003" and (tmp_path / "latest").read_text() == "step-00000003\n"
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.pt", "meta.json"} <= {
        p.name for p in path.iterdir()}
    torch.load(path / "trainer_state.pt", weights_only=True)  # plain data only
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 3 and meta["config"] == {"run": {"max_steps": 9}} and meta["metrics_tail"][0]["reward"] == 0.5

    # what the run would do next, from the saved point
    expected_rng = (random.random(), np.random.rand(), torch.rand(1).item())
    expected_batch = [ex.prompt for ex in batcher.next_batch()]
    saved_weights = lora_state(model)
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors
    train_steps(model, opt, sched, 2)  # the trained-on copy we are resuming into; then "restart"

    model2, opt2, sched2 = make_trainer(seed=5)  # different initial weights
    ptrs = {n: p.data_ptr() for n, p in model2.named_parameters()}
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    state = load_checkpoint(tmp_path, model2, opt2, sched2)
    assert state.step == 3 and state.path == path
    assert torch.equal(state.extra["old_logprobs_seen"], torch.tensor([1.0, 2.0]))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_rng
    for n, w in lora_state(model2).items():
        assert torch.equal(w, saved_weights[n]), n
    assert {n: p.data_ptr() for n, p in model2.named_parameters()} == ptrs  # in place: same storage
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == pytest.approx([1e-3 * 0.4])
    s2 = opt2.state_dict()
    for k, st in saved_opt["state"].items():
        assert torch.equal(s2["state"][k]["exp_avg"], st["exp_avg"])
        assert torch.equal(s2["state"][k]["exp_avg_sq"], st["exp_avg_sq"])
        assert float(s2["state"][k]["step"]) == float(st["step"])
    b2 = PromptBatcher(load_dataset("builtin:repeat", builtin_size=20), 4, seed=3)
    b2.load_state_dict(state.data_state)
    assert [ex.prompt for ex in b2.next_batch()] == expected_batch

    # the restored trainer continues exactly like the original one would have
    model3, opt3, sched3 = make_trainer(seed=5)  # same base weights as model2 (the adapter is what is saved)
    load_checkpoint(path, model3, opt3, sched3)
    train_steps(model2, opt2, sched2, 2)
    train_steps(model3, opt3, sched3, 2)
    for n, w in lora_state(model2).items():
        assert torch.equal(w, lora_state(model3)[n])


def test_adapter_mismatch_is_a_clear_error(tmp_path):
    model, opt, sched = make_trainer(rank=4)
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)
    other, _, _ = make_trainer(rank=8)
    with pytest.raises(CheckpointError, match="does not match the model.*lora_rank changed"):
        load_checkpoint(tmp_path, other)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(_empty(tmp_path), model)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope", model)
    assert isinstance(CheckpointError("x"), CompilepassError)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir(exist_ok=True)
    return d


def test_rng_state_is_plain_data_and_round_trips(tmp_path):
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    a = (random.random(), np.random.rand(), torch.rand(2).tolist())
    restore_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == a


def test_keep_last_k_and_resave_same_step(tmp_path):
    model, opt, sched = make_trainer()
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert find_latest(tmp_path) == tmp_path / "step-00000005"
    save_checkpoint(tmp_path, 5, model=model, optimizer=opt, scheduler=sched, keep_last=2, extra={"v": 2})
    assert load_checkpoint(tmp_path, model).extra == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    with pytest.raises(CheckpointError, match=r"keep_last must be an integer >= 1 \(got 0\)"):
        save_checkpoint(tmp_path, 6, model=model, keep_last=0)
    assert find_latest(tmp_path) == tmp_path / "step-00000005"


def test_stale_temp_dir_is_ignored_and_cleaned(tmp_path):
    model, opt, sched = make_trainer()
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)
    stale = tmp_path / ".tmp-step-00000002-abc"
    stale.mkdir()
    (stale / "trainer_state.pt").write_bytes(b"half a file")
    incomplete = tmp_path / "step-00000009"  # e.g. copied by hand, without its state
    incomplete.mkdir()
    assert find_latest(tmp_path) == tmp_path / "step-00000001"
    assert load_checkpoint(tmp_path, model).step == 1
    assert not stale.exists()
    assert cleanup_partial(tmp_path) == []


CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    from compilepass.standby.grpo import checkpoint as c
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_trainer, train_steps
    out, stage = sys.argv[1], sys.argv[2]
    model, opt, sched = make_trainer()
    train_steps(model, opt, sched, 1)
    c.save_checkpoint(out, 1, model=model, optimizer=opt, scheduler=sched, extra={{"tag": "first"}})
    train_steps(model, opt, sched, 1)
    def hook(s):
        if s == stage:
            os.kill(os.getpid(), signal.SIGKILL)
    c.save_checkpoint(out, 2, model=model, optimizer=opt, scheduler=sched, extra={{"tag": "second"}}, on_stage=hook)
    print("not killed")
""")


@pytest.mark.parametrize("stage, expected_step", [("fsynced", 1), ("renamed", 2)])  # before / after the commit point
def test_sigkill_during_save_keeps_a_loadable_checkpoint(tmp_path, stage, expected_step):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CHILD.format(tests=str(REPO / "tests")), str(out), stage],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert (out / "latest").read_text() == "step-00000001\n"  # the pointer was never moved
    if expected_step == 1:
        assert any(p.name.startswith(".tmp-step-00000002") for p in out.iterdir())  # the torn save
    model, opt, sched = make_trainer(seed=3)
    state = load_checkpoint(out, model, opt, sched)
    assert state.step == expected_step
    assert state.extra == {"tag": "first" if expected_step == 1 else "second"}
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_state_unsafely(ckpt: Path) -> None:
    """A trainer_state.pt holding a pickled object, with meta.json's digests updated to match: only
    torch.load(weights_only=True) can tell."""
    import datetime
    import hashlib

    torch.save({"step": 2, "when": datetime.timedelta(days=1)}, ckpt / "trainer_state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    data = (ckpt / "trainer_state.pt").read_bytes()
    meta["files"]["trainer_state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, reason", [
    (lambda c: (c / "adapter_model.safetensors").write_bytes((c / "adapter_model.safetensors").read_bytes()[:500]),
     r"adapter_model.safetensors is 500 bytes, meta.json recorded \d+ \(truncated or overwritten\)"),
    (lambda c: (c / "trainer_state.pt").write_bytes((c / "trainer_state.pt").read_bytes()[:-1]),
     r"trainer_state.pt is \d+ bytes, meta.json recorded \d+"),
    (lambda c: _flip_byte(c / "adapter_model.safetensors", -5),
     r"adapter_model.safetensors does not match the sha256 that meta.json recorded \(corrupt\)"),
    (lambda c: (c / "meta.json").write_bytes(b"\xff\xfe garbage"), r"meta.json is unreadable \(UnicodeDecodeError"),
    (lambda c: (c / "meta.json").write_text("[1, 2]"), r"meta.json is not a JSON object"),
    (lambda c: (c / "trainer_state.pt").unlink(), r"trainer_state.pt is missing"),
    (_rewrite_state_unsafely, r"trainer_state.pt does not load with torch.load\(weights_only=True\) "
                              r"\(UnpicklingError: WeightsUnpickler error: Unsupported global"),
], ids=["truncated-adapter", "truncated-state", "flipped-adapter-byte", "meta-not-utf8", "meta-not-object",
        "state-missing", "state-not-weights-only"])
def test_a_damaged_checkpoint_does_not_verify(tmp_path, damage, reason):
    """Each kind of damage: verify_checkpoint names it; load_checkpoint refuses it in one line
    without touching the model; find_latest_valid passes over it to the one before and deletes
    nothing."""
    model, opt, sched = make_trainer()
    for step in (1, 2):
        train_steps(model, opt, sched, 1)
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched)
    bad = tmp_path / "step-00000002"
    verify_checkpoint(bad)
    damage(bad)
    with pytest.raises(CheckpointError, match=reason) as ei:
        verify_checkpoint(bad)
    assert "\n" not in str(ei.value) and ei.value.reason is not None
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    other, _, _ = make_trainer(seed=7)
    weights = lora_state(other)
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} is unusable: " + reason):
        load_checkpoint(bad, other)
    assert all(torch.equal(w, weights[n]) for n, w in lora_state(other).items())
    found, skipped = find_latest_valid(tmp_path)
    assert found == tmp_path / "step-00000001" and [p for p, _ in skipped] == [bad]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    assert load_checkpoint(found, other).step == 1


def test_find_latest_valid_edge_cases(tmp_path):
    assert find_latest_valid(tmp_path / "absent") == (None, [])
    assert find_latest_valid(tmp_path) == (None, [])
    (tmp_path / "step-00000003").mkdir()  # incomplete: named, since it is newer than what is chosen
    model, opt, sched = make_trainer()
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    found, skipped = find_latest_valid(tmp_path)
    assert found == tmp_path / "step-00000002" and skipped == [(tmp_path / "step-00000003", "meta.json is missing")]
    meta = json.loads((tmp_path / "step-00000002" / "meta.json").read_text())
    assert set(meta["files"]) == {"adapter_model.safetensors", "adapter_config.json", "trainer_state.pt"}
    del meta["files"]  # a checkpoint from before the digests: verified by loading alone
    (tmp_path / "step-00000002" / "meta.json").write_text(json.dumps(meta))
    verify_checkpoint(tmp_path / "step-00000002")


SAVE_FAILS = textwrap.dedent("""
    import resource, sys
    from compilepass.standby.grpo import checkpoint as c
    from compilepass.core.errors import CompilepassError
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_trainer, train_steps
    out = sys.argv[1]
    model, opt, sched = make_trainer()
    train_steps(model, opt, sched, 1)
    c.save_checkpoint(out, 1, model=model, optimizer=opt, scheduler=sched)
    size = (c.Path(out) / "step-00000001" / "trainer_state.pt").stat().st_size
    def limit(stage):
        if stage == "adapter":
            resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))
    try:
        c.save_checkpoint(out, 2, model=model, optimizer=opt, scheduler=sched, on_stage=limit)
    except CompilepassError as e:
        print(type(e).__name__, e)
""")


def test_save_failing_half_way_raises_one_line_and_keeps_the_previous(tmp_path):
    """A trainer_state.pt write cut short by RLIMIT_FSIZE (set in a child): CheckpointError in one
    line, the temp directory gone, step 1 still the newest and loadable."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", SAVE_FAILS.format(tests=str(REPO / "tests")), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    assert line.startswith("CheckpointError cannot write checkpoint step-00000002") and "trainer_state.pt" in line
    assert line.endswith("step-00000001 is still the newest checkpoint"), line
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step-00000001"]
    verify_checkpoint(out / "step-00000001")


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_append_and_truncate_on_resume(tmp_path):
    with MetricsLogger(tmp_path, resume_step=None) as m:
        for step in range(1, 6):
            m.log(step, {"reward": torch.tensor(step / 10), "kl": 0.0, "nan": float("nan")})
        assert [r["step"] for r in m.tail(2)] == [4, 5]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # a line torn by kill -9
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5] and recs[0]["reward"] == pytest.approx(0.1)
    assert recs[0]["nan"] == "nan"

    with MetricsLogger(tmp_path, resume_step=3) as m:  # resumed from the step-3 checkpoint
        assert [r["step"] for r in m.tail(10)] == [1, 2, 3]
        m.log(4, {"reward": 0.9})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert json.loads(lines[-1])["reward"] == 0.9

    with MetricsLogger(tmp_path, resume_step=0) as m:  # resumed before any step: step 0 may be logged
        m.log(0, {"reward": 0.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0]
    with MetricsLogger(tmp_path):  # a fresh run starts an empty log
        pass
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_missing_is_a_config_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="tensorboard package is not installed"):
            MetricsLogger(tmp_path, tensorboard=True)
    else:
        with MetricsLogger(tmp_path, tensorboard=True) as m:
            m.log(1, {"reward": 1.0})
        assert (tmp_path / "tensorboard").is_dir()


def test_progress_bar_formats_and_runs(tmp_path):
    s = ProgressBar.format_stats({"reward": torch.tensor(0.5), "kl": 0.01, "tokens_per_s": 12345.6,
                                  "peak_mem_gib": 1.5, "other": 3})
    assert s == "reward 0.500  kl 0.0100  tok/s 12,346  peak 1.50 GiB"
    assert ProgressBar.format_line(3, 14, {"reward": 0.12345, "loss": -0.0012, "step_s": 0.123, "tokens_per_s": 1234.5,
                                           "kl": 0.1}) == "grpo: step 3/14  reward 0.1235  loss -0.0012  0.12 s  1,234 tok/s"
    assert ProgressBar(3, enabled="lines").mode == "lines" and ProgressBar(3, enabled=False).mode == "off"
    with pytest.raises(ConfigError, match="progress must be"):
        ProgressBar(3, enabled="yes")
    with ProgressBar(3, enabled=True) as bar:
        for step in range(1, 4):
            bar.update(step, {"reward": 0.1})
    with ProgressBar(3, enabled=False) as bar:
        bar.update(1, {})
    assert peak_memory_gib() > 0


def test_saving_after_resuming_from_an_earlier_step_drops_later_checkpoints(tmp_path):
    model, opt, sched = make_trainer()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, keep_last=5)
    load_checkpoint(tmp_path / "step-00000002", model, opt, sched)  # resume: run.resume=<path>
    save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, keep_last=5)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert find_latest(tmp_path) == tmp_path / "step-00000003"
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())

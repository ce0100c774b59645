"""Rewards called as TRL calls them: TRL's own reward functions unchanged (trl.rewards), callables and
names, every dataset column as a keyword, None scores, async rewards run concurrently, and short GRPO
runs (tiny preset; a conversational one on a tiny chat model directory) through GRPOTrainer."""

from __future__ import annotations

import asyncio
import functools
import math

import datasets
import pytest
import torch
from tiny_chat_model import make_chat_model_dir
from trl.rewards import (accuracy_reward, get_cosine_scaled_reward, get_repetition_penalty_reward,
                         get_soft_overlong_punishment, reasoning_accuracy_reward, think_format_reward)
from trl.trainer.utils import nanstd

from compilepass.core.errors import ConfigError
from compilepass.standby.grpo.config import default_config, load_config
from compilepass.standby.grpo.rewards import RewardError, RewardSet
from compilepass.standby.grpo.trainer import GRPOTrainer
from compilepass.standby.training.loss import group_advantages

pytest.importorskip("math_verify")  # accuracy_reward's dependency (the dev extra installs it)

COMPLETIONS = [
    [{"role": "assistant", "content": "<think>add them</think> so \\boxed{4}"}],
    [{"role": "assistant", "content": "the answer is \\boxed{5}"}],
    [{"role": "assistant", "content": "<think>hmm</think> \\boxed{\\frac{1}{2}}"}],
    [{"role": "assistant", "content": "no idea"}],
]
PROMPTS = [[{"role": "user", "content": q}] for q in ("2+2?", "2+2?", "half?", "nothing?")]
SOLUTIONS = ["$4$", "$4$", "$\\frac{1}{2}$", "not parseable ]]"]
IDS = [[5] * 3, [7, 8] * 4, [1, 2, 3, 1, 2, 3], list(range(12))]


def trl_inputs():
    return dict(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=IDS, columns={"solution": SOLUTIONS})


def trl_functions():
    return [think_format_reward, accuracy_reward, reasoning_accuracy_reward, get_soft_overlong_punishment(10, 4),
            get_repetition_penalty_reward(ngram_size=2), get_cosine_scaled_reward(max_len=12)]


def test_trl_reward_functions_run_unchanged_through_reward_set():
    """Each TRL reward scores through RewardSet exactly as TRL's own call does (the reference: the
    function called with the keywords TRL's GRPOTrainer passes); None becomes NaN."""
    fns = trl_functions()
    rs = RewardSet.from_specs(fns)
    assert rs.names == ["think_format_reward", "accuracy_reward", "reasoning_accuracy_reward",
                        "soft_overlong_punishment_reward", "repetition_penalty_reward", "cosine_scaled_reward"]
    total, parts = rs.score(**trl_inputs(), trainer_state=None)
    for name, fn in zip(rs.names, fns):
        expected = fn(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=IDS, solution=SOLUTIONS)
        got = parts[name].tolist()
        assert [None if math.isnan(v) else v for v in got] == pytest.approx(expected, abs=1e-6), name
    assert parts["think_format_reward"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert parts["accuracy_reward"].tolist()[:3] == [1.0, 0.0, 1.0] and math.isnan(parts["accuracy_reward"][3])
    assert parts["soft_overlong_punishment_reward"].tolist() == [0.0, -0.5, 0.0, -1.0]
    # NaN-ignoring weighted sum, as TRL's nansum over the functions
    stacked = torch.stack([parts[n] for n in rs.names], 1)
    assert torch.allclose(total, stacked.nansum(1))


def test_none_scores_follow_trl():
    """A row no function scored has a NaN total; group advantages leave it out of the mean and std
    and give it 0, as TRL's (nanmean, nanstd, nan_to_num) do."""
    def sometimes(completions, **kwargs):
        return [None if c.startswith("skip") else float(len(c)) for c in completions]

    def never_last(completions, **kwargs):
        return [1.0, None, None, None, None, 0.5][: len(completions)]

    rs = RewardSet.from_specs([(sometimes, 1.0), (never_last, 2.0)])
    completions = ["aaa", "skip", "a", "skip", "aa", "skipped"]
    total, parts = rs.score(["p"] * 6, completions)
    assert total.tolist()[:3] == [5.0, pytest.approx(float("nan"), nan_ok=True), 1.0]
    assert [math.isnan(v) for v in total.tolist()] == [False, True, False, True, False, False]
    assert total[5].item() == 1.0  # sometimes: None, never_last: 0.5 * 2
    adv, zero = group_advantages(total, 3, scale=True)
    grouped = total.view(-1, 3)
    mean = torch.nanmean(grouped, 1, keepdim=True)
    expected = torch.nan_to_num((grouped - mean) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4), nan=0.0)
    assert torch.allclose(adv, expected.reshape(-1), atol=1e-6)
    assert adv[1].item() == 0.0 and adv[3].item() == 0.0 and zero == 0
    # without NaN the advantages are what they were
    clean = torch.tensor([1.0, 2.0, 4.0, 3.0, 3.0, 3.0])
    adv, zero = group_advantages(clean, 3)
    assert zero == 1 and torch.allclose(adv[:3], (clean[:3] - clean[:3].mean()) / (clean[:3].std() + 1e-4))


def test_columns_reach_the_rewards_as_keyword_lists():
    seen = {}

    def every_keyword(**kwargs):
        seen.update(kwargs)
        return [0.0] * len(kwargs["completions"])

    def named_only(completions, level):  # no **kwargs: gets only what it names
        return [float(x) for x in level]

    state = object()
    rs = RewardSet.from_specs([every_keyword, named_only])
    _, parts = rs.score(["a", "a", "b", "b"], ["x", "y", "z", "w"], completion_ids=[[1], [2], [3], [4]],
                        columns={"level": [1, 1, 2, 2], "answer": ["A", "A", "B", "B"]}, trainer_state=state)
    assert parts["named_only"].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert seen["prompts"] == ["a", "a", "b", "b"] and seen["completion_ids"] == [[1], [2], [3], [4]]
    assert seen["level"] == [1, 1, 2, 2] and seen["answer"] == ["A", "A", "B", "B"]
    assert seen["trainer_state"] is state and callable(seen["log_metric"]) and callable(seen["log_extra"])
    with pytest.raises(ConfigError, match="dataset column 'completions' has the name of a reward function argument"):
        rs.check_columns(["completions"])
    with pytest.raises(ConfigError, match=r"reward 'accuracy_reward' needs 'solution', which no dataset column gives "
                                          r"\(columns: answer\)"):
        RewardSet.from_specs([accuracy_reward]).check_columns(["answer"])


def test_callables_names_and_weights():
    def score(completions, **kwargs):
        return [1.0] * len(completions)

    class Scorer:
        def __call__(self, completions, **kwargs):
            return [2.0] * len(completions)

    partial = functools.partial(lambda completions, bonus, **kw: [bonus] * len(completions), bonus=3.0)
    rs = RewardSet.from_specs([score, (score, 0.5), Scorer(), partial, ("format_answer_tag", 2.0)])
    assert rs.names == ["score", "score_2", "Scorer", "<lambda>", "format_answer_tag"]
    total, _ = rs.score(["p"], ["<answer>1</answer>"])
    assert total.tolist() == [1.0 + 0.5 + 2.0 + 3.0 + 2.0]
    with pytest.raises(ConfigError, match="a reward must be a name or a callable, not int"):
        RewardSet.from_specs([(3, 1.0)])


def test_trainer_state_and_log_metric():
    def shaped(completions, trainer_state, log_metric, **kwargs):
        log_metric("progress", trainer_state.global_step / trainer_state.max_steps)
        log_metric("progress", 0.0)
        return [float(trainer_state.epoch)] * len(completions)

    from compilepass.standby.grpo.reward_inputs import reward_trainer_state

    rs = RewardSet.from_specs([shaped])
    total, _ = rs.score(["p"], ["c"], trainer_state=reward_trainer_state(step=5, max_steps=10, epoch=1.25))
    assert total.tolist() == [1.25] and rs.logged_metrics == {"progress": 0.2}


# ------------------------------------------------------------------------------------------- async


def test_async_rewards_run_concurrently():
    """Each async reward waits for an event only the other one sets: run one after the other they
    would deadlock (wait_for's timeout is only a guard against a hang)."""
    left, right = asyncio.Event(), asyncio.Event()

    async def first(completions, **kwargs):
        left.set()
        await asyncio.wait_for(right.wait(), timeout=30)
        return [1.0] * len(completions)

    async def second(completions, **kwargs):
        right.set()
        await asyncio.wait_for(left.wait(), timeout=30)
        return [2.0] * len(completions)

    def sync(completions, **kwargs):
        return [4.0] * len(completions)

    rs = RewardSet.from_specs([first, sync, second])
    try:
        total, parts = rs.score(["p", "q"], ["a", "b"])
    finally:
        rs.close()
    assert total.tolist() == [7.0, 7.0] and parts["second"].tolist() == [2.0, 2.0]


def test_async_rewards_share_one_loop_and_report_errors():
    loops = []

    class Judge:  # an async callable object (TRL: a class with async __call__)
        async def __call__(self, prompts, completions, **kwargs):
            loops.append(asyncio.get_running_loop())
            await asyncio.sleep(0)
            if any(c == "bad" for c in completions):
                raise ValueError("the judge refused")
            return [0.5] * len(completions)

    rs = RewardSet.from_specs([Judge()])
    try:
        for _ in range(2):
            assert rs.score(["p"], ["ok"])[0].tolist() == [0.5]
        assert loops[0] is loops[1]  # one loop per RewardSet: a client cached by the reward stays usable
        with pytest.raises(RewardError) as e:
            rs.score(["p0", "p1 the bad one"], ["fine", "bad"])
    finally:
        rs.close()
    assert str(e.value) == "reward 'Judge' failed on sample 1 (prompt 'p1 the bad one'): ValueError: the judge refused"


# ------------------------------------------------------------------------------------- GRPO runs


def test_grpo_tiny_preset_with_trl_rewards_and_a_dataset_object(tmp_path):
    """A short run on the tiny preset: a datasets.Dataset passed in Python with an extra column,
    TRL's token-id rewards, an async reward and a column reward; metrics per function; the
    trainer_state's global_step counts the steps done."""
    steps_seen, columns_seen = [], []

    async def async_len(completions, **kwargs):
        await asyncio.sleep(0)
        return [len(c) / 8 for c in completions]

    def column_reward(completions, target, trainer_state, **kwargs):
        steps_seen.append(trainer_state.global_step)
        columns_seen.append(target)
        return [float(c.count(t)) for c, t in zip(completions, target)]

    rows = [{"prompt": f"Repeat the letter {c}: ", "target": c} for c in "abcdefgh" * 2]
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", "run.max_steps=2", "data.prompts_per_step=2",
                             "generation.num_generations=4", "generation.max_completion_len=6"],
                      base=default_config("tiny"))
    trainer = GRPOTrainer(cfg, progress=False, train_dataset=datasets.Dataset.from_list(rows),
                          reward_funcs=[get_soft_overlong_punishment(6, 2), (get_repetition_penalty_reward(2), 0.5),
                                        async_len, column_reward])
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    rec = summary.metrics[-1]
    for key in ("rewards/soft_overlong_punishment_reward/mean", "rewards/repetition_penalty_reward/mean",
                "rewards/async_len/mean", "rewards/column_reward/mean"):
        assert math.isfinite(rec[key]), key
    assert steps_seen == [0, 1]
    assert all(len(t) == 8 and t[0] == t[3] and t[4] == t[7] for t in columns_seen)  # one per completion, by group


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return make_chat_model_dir(tmp_path_factory.mktemp("chat_model") / "m")


def _chat_config(tmp_path, model, name, steps):
    return load_config(None, [f"model.name_or_path={model}", "model.lora_rank=4", "model.gradient_checkpointing=false",
                              "generation.max_prompt_len=64", "generation.max_completion_len=8",
                              "generation.num_generations=4", "data.prompts_per_step=2", f"run.max_steps={steps}",
                              "run.device=cpu", f"run.output_dir={tmp_path / name}", "run.save_every=2",
                              "optim.lr=1e-3", "data.chat_template_kwargs={enable_thinking: false}"])


def test_grpo_conversational_run_with_trl_rewards_and_exact_resume(tmp_path, chat_model):
    """A conversational datasets.Dataset through the trainer on a chat-templated model: TRL's
    think_format_reward and accuracy_reward unchanged, completions handed over as messages; then
    a run stopped after step 2 and resumed draws the same prompts and logs the same step 3."""
    seen = []

    def probe(prompts, completions, completion_ids, solution, **kwargs):
        seen.append((prompts[0], completions[0], len(completion_ids[0])))
        return [float(len(ids)) / 8 for ids in completion_ids]

    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {a}?"}], "solution": f"${2 * a}$"}
            for a in range(12)]
    funcs = [think_format_reward, accuracy_reward, probe]

    def run(name, steps, resume="auto"):
        cfg = _chat_config(tmp_path, chat_model, name, steps)
        cfg.run.resume = resume
        trainer = GRPOTrainer(cfg, progress=False, train_dataset=datasets.Dataset.from_list(rows), reward_funcs=funcs)
        try:
            return trainer.train()
        finally:
            trainer.close()

    full = run("full", 3)
    prompt, completion, n_ids = seen[0]
    assert prompt in [r["prompt"] for r in rows]
    assert isinstance(completion, list) and completion[0]["role"] == "assistant" and isinstance(
        completion[0]["content"], str) and 1 <= n_ids <= 8
    rec = full.metrics[-1]
    assert {"rewards/think_format_reward/mean", "rewards/accuracy_reward/mean", "rewards/probe/mean"} <= set(rec)
    drawn_full = [p for p, _, _ in seen]
    seen.clear()
    run("split", 2)
    resumed = run("split", 3)
    assert resumed.start_step == 2 and resumed.steps_done == 1
    assert [p for p, _, _ in seen] == drawn_full  # steps 1, 2, then the resumed step 3
    for key in ("reward", "rewards/probe/mean", "loss", "grad_norm", "completions/mean_length"):
        assert resumed.metrics[-1][key] == pytest.approx(rec[key], rel=1e-6, abs=1e-6), key

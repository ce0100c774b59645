"""GRPOArguments (TRL's flat names): TRL 1.16's defaults, the conversion to our sectioned config and
back, the one-line refusals, GRPOTrainer(args=...) on the tiny preset, and `compilepass grpo
--learning_rate ...` (real TRL, transformers and datasets; no mocks)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import datasets
import pytest
import torch
from peft import LoraConfig

import compilepass
from compilepass import cli
from compilepass.core.errors import ConfigError
from compilepass.standby.grpo.config import SECTIONS, GRPOConfig, default_config, load_config
from compilepass.standby.grpo.metrics import read_metrics
from compilepass.standby.grpo.trainer import GRPOTrainer
from compilepass.standby.grpo.trl_args import MAPPING, GRPOArguments
from compilepass.standby.grpo.trl_convert import apply_arguments, from_grpo_config, to_grpo_config, trainer_config

#: GRPOArguments fields that trl 1.16's GRPOConfig does not have: older TRL / transformers names and ours.
NOT_IN_TRL = {"max_prompt_length", "warmup_ratio", "engine", "standby", "gpu_memory_utilization", "device", "overrides"}


def _trl_fields():
    import trl

    return {f.name: f for f in dataclasses.fields(trl.GRPOConfig)}


def test_fields_and_defaults_are_trls():
    trl_fields = _trl_fields()
    ours = dataclasses.fields(GRPOArguments)
    assert {f.name for f in ours} - set(trl_fields) == NOT_IN_TRL
    for f in ours:
        if f.name in NOT_IN_TRL or f.name == "output_dir":
            continue
        theirs = trl_fields[f.name].default
        theirs = getattr(theirs, "value", theirs)  # transformers' str enums
        assert f.default == theirs, (f.name, f.default, theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import trl

        resolved = trl.GRPOConfig(use_cpu=True, bf16=False)
    assert GRPOArguments().output_dir == resolved.output_dir == "trainer_output"  # None, resolved by transformers
    # the table: every field, and only keys that exist
    assert set(MAPPING) == {f.name for f in ours}
    for name, keys in MAPPING.items():
        for key in keys:
            section, field = key.split(".")
            assert field in {f.name for f in dataclasses.fields(SECTIONS[section])}, (name, key)


def test_to_grpo_config_maps_each_name():
    a = GRPOArguments(output_dir="/tmp/x", max_steps=8, seed=7, learning_rate=3e-5, weight_decay=0.01, adam_beta1=0.8,
                      adam_beta2=0.95, adam_epsilon=1e-6, max_grad_norm=0.5, lr_scheduler_type="cosine_with_min_lr",
                      lr_scheduler_kwargs='{"min_lr_rate": 0.1}', warmup_steps=0.25, logging_steps=0.5, save_steps=2,
                      per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                      max_prompt_length=64, max_completion_length=32, temperature=0.7, top_p=0.9, top_k=5,
                      chat_template_kwargs='{"enable_thinking": false}', beta=0.04, epsilon=0.3, loss_type="grpo",
                      scale_rewards=False, importance_sampling_level="sequence", mask_truncated_completions=True,
                      use_bias_correction_kl=False, gradient_checkpointing=False,
                      model_init_kwargs={"dtype": "bfloat16"}, report_to="tensorboard", use_cpu=True,
                      overrides={"model.lora_rank": 4})
    c = to_grpo_config(a)
    assert (c.run.output_dir, c.run.max_steps, c.run.seed, c.data.seed) == ("/tmp/x", 8, 7, 7)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.betas, c.optim.eps, c.optim.max_grad_norm) == (
        3e-5, 0.01, [0.8, 0.95], 1e-6, 0.5)
    assert (c.optim.scheduler, c.optim.scheduler_kwargs, c.optim.warmup_steps) == (
        "cosine_with_min_lr", {"min_lr_rate": 0.1}, 2)  # 0.25 of 8 steps
    assert (c.run.log_every, c.run.save_every, c.run.keep_last) == (4, 2, 8)  # save_total_limit None: keep all
    # 4 per forward x 2 accumulated = 8 completions per update = 2 prompts of 4
    assert (c.optim.micro_batch_size, c.data.prompts_per_step, c.generation.num_generations) == (4, 2, 4)
    g = c.generation
    assert (g.max_prompt_len, g.max_completion_len, g.temperature, g.top_p, g.top_k) == (64, 32, 0.7, 0.9, 5)
    assert c.data.chat_template_kwargs == {"enable_thinking": False}
    lo = c.loss
    assert (lo.beta, lo.epsilon_low, lo.epsilon_high, lo.loss_type, lo.scale_rewards) == (0.04, 0.3, 0.3, "grpo", False)
    assert lo.importance_sampling_level == "sequence" and lo.mask_truncated_completions and not lo.use_bias_correction_kl
    assert not lo.importance_sampling_correction  # TRL corrects vLLM's sampling only
    assert (c.model.gradient_checkpointing, c.model.dtype, c.model.lora_rank) == (False, "bfloat16", 4)
    assert (c.run.report_to, c.run.device) == (["tensorboard"], "cpu")
    v = to_grpo_config(GRPOArguments(max_steps=3, use_vllm=True, epsilon_high=0.28, data_seed=5))
    assert (v.generation.engine, v.loss.importance_sampling_correction) == ("vllm", True)
    assert (v.loss.epsilon_low, v.loss.epsilon_high, v.data.seed, v.run.seed) == (0.2, 0.28, 5, 42)
    # TRL's defaults: one prompt of 8 per step (per_device_train_batch_size 8), dapo, linear
    d = to_grpo_config(GRPOArguments(max_steps=10))
    assert (d.data.prompts_per_step, d.loss.loss_type, d.optim.scheduler, d.optim.lr, d.run.log_every) == (
        1, "dapo", "linear", 1e-6, 10)
    # max_steps -1: num_train_epochs over the dataset's rows, as TRL counts steps
    assert to_grpo_config(GRPOArguments(num_train_epochs=2, per_device_train_batch_size=16),
                          num_examples=10).run.max_steps == 10  # 2 epochs x (10 rows // 2 prompts per step)


@pytest.mark.parametrize("overrides", [
    [], ["optim.scheduler=cosine", "optim.warmup_steps=3"], ["optim.micro_batch_size=16"], ["optim.micro_batch_size=3"],
    ["generation.engine=vllm", "loss.importance_sampling_correction=false"], ["loss.importance_sampling_correction=true"],
    ["run.logging_steps=5"], ["run.keep_last=100"], ["run.save_every=0", "data.seed=9"],
    ["generation.stop=['\\n']", "reward.functions=[{name: repeat_letter, weight: 2.0}]", "run.report_to=tensorboard"],
    ["optim.scheduler=cosine_with_min_lr", "optim.scheduler_kwargs={min_lr_rate: 0.2}"],
], ids=lambda o: " ".join(o) or "tiny")
def test_round_trip_config_to_arguments_and_back(overrides):
    c = load_config(None, overrides, base=default_config("tiny"))
    flat = from_grpo_config(c)
    assert to_grpo_config(flat) == c
    # TRL's fields carry what they can say; overrides only the rest
    assert (flat.learning_rate, flat.num_generations, flat.max_completion_length, flat.max_steps) == (
        c.optim.lr, c.generation.num_generations, c.generation.max_completion_len, c.run.max_steps)
    said = {keys[0] for name, keys in MAPPING.items() if keys}
    partly = {"optim.micro_batch_size", "loss.importance_sampling_correction", "run.keep_last", "reward.functions"}
    assert not (said - partly) & set(flat.overrides or {}), flat.overrides


def test_round_trip_arguments_to_config_and_back():
    a = GRPOArguments(max_steps=20, learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=2, num_generations=4,
                      per_device_train_batch_size=4, gradient_accumulation_steps=4, beta=0.1, epsilon=0.2,
                      epsilon_high=0.28, loss_type="bnpo", logging_steps=2, save_steps=5, save_total_limit=2,
                      seed=3, use_cpu=True, temperature=0.9, report_to="none")
    back = from_grpo_config(to_grpo_config(a))
    for f in dataclasses.fields(GRPOArguments):
        if f.name in ("device", "use_cpu", "model_init_kwargs", "overrides", "report_to", "engine"):
            continue
        assert getattr(back, f.name) == getattr(a, f.name), f.name
    assert back.device == "cpu" and back.overrides is None and back.engine == "native"
    assert to_grpo_config(back) == to_grpo_config(a)


def test_refusals_are_one_line_listing_every_name():
    with pytest.raises(ConfigError) as e:
        GRPOArguments(bf16=True, eval_steps=10, max_steps=3)
    msg = str(e.value)
    assert msg.startswith("GRPOArguments: not supported here: bf16 (the weights' dtype is model_init_kwargs=")
    assert "eval_steps" in msg and "\n" not in msg
    with pytest.raises(ConfigError) as e:
        to_grpo_config(GRPOArguments(max_steps=3, loss_type="sapo", scale_rewards="batch", optim="sgd", num_iterations=2,
                                     save_strategy="epoch", use_vllm=True, vllm_mode="server",
                                     model_init_kwargs={"attn_implementation": "sdpa"}))
    msg = str(e.value)
    for needle in ("loss_type='sapo'", "scale_rewards='batch'", "optim='sgd'", "num_iterations=2",
                   "save_strategy='epoch'", "vllm_mode='server'", "model_init_kwargs keys attn_implementation"):
        assert needle in msg, needle
    assert "\n" not in msg
    for kwargs, needle in [
        (dict(max_steps=3, generation_batch_size=64), "a generation batch of 64 completions for optimizer steps of 8"),
        (dict(max_steps=3, steps_per_generation=4), "a generation batch of 32 completions for optimizer steps of 8"),
        (dict(max_steps=3, per_device_train_batch_size=6), "6 completions is not whole groups of num_generations=8"),
        (dict(), "max_steps=-1 without a train_dataset"),
        (dict(max_steps=3, learning_rate="fast"), "GRPOArguments: 'learning_rate' must be a number (got 'fast')"),
        (dict(max_steps=3, num_generations=1, per_device_train_batch_size=2),
         "'num_generations' (generation.num_generations) must be >= 2"),
        (dict(max_steps=3, temperature=0.0), "'temperature' (generation.temperature) must be > 0"),
        (dict(max_steps=3, overrides={"lr": 1}), "overrides key 'lr' must be section.key"),
        (dict(max_steps=3, overrides={"optim.foo": 1}), "unknown key 'optim.foo'"),
        (dict(max_steps=3, lr_scheduler_kwargs="{bad"), "'lr_scheduler_kwargs' must be a mapping or its JSON text"),
        (dict(max_steps=3, save_steps=2.5), "save_steps=2.5 (a whole number of steps"),
    ]:
        with pytest.raises(ConfigError) as e:
            to_grpo_config(GRPOArguments(**kwargs))
        assert needle in str(e.value) and "\n" not in str(e.value), (kwargs, str(e.value))


def test_trainer_config_takes_either_class_once():
    import trl

    c = default_config("tiny")
    assert trainer_config(c, None, None, None) == (c, None)
    assert trainer_config(None, c, None, None) == (c, None)
    with pytest.raises(ConfigError, match="give the config once"):
        trainer_config(c, c, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = trl.GRPOConfig(use_cpu=True, bf16=False)
    with pytest.raises(ConfigError, match=r"not trl\.GRPOConfig \(TRL's own class: use compilepass\.GRPOArguments"):
        trainer_config(None, theirs, None, None)
    with pytest.raises(ConfigError, match="GRPOArguments needs train_dataset="):
        trainer_config(None, GRPOArguments(max_steps=2), None, None)

    def f(completions, **kw):
        return [0.0] * len(completions)

    config, funcs = trainer_config(None, GRPOArguments(max_steps=2, reward_weights=[0.5, 2.0]), [f, "exact_match"],
                                   [{"prompt": "a"}])
    assert funcs == [(f, 0.5), ("exact_match", 2.0)]
    with pytest.raises(ConfigError, match="reward_weights has 1 weights for 2 reward functions"):
        trainer_config(None, GRPOArguments(max_steps=2, reward_weights=[1.0]), [f, f], [{"prompt": "a"}])


def _length_reward(completions, **kwargs):
    """A TRL-style reward: keywords, one float per completion."""
    return [float(len(c)) / 8 for c in completions]


def test_grpo_trainer_with_args_two_steps_on_the_tiny_preset(tmp_path):
    """TRL's call shape: model=, reward_funcs=, args=GRPOArguments(...), train_dataset=, peft_config=.
    max_steps -1 and one epoch over 4 rows at 2 prompts per step is 2 steps."""
    from transformers import get_scheduler

    rows = [{"prompt": f"Repeat the letter {c}: ", "answer": c} for c in "abcd"]
    args = compilepass.GRPOArguments(output_dir=str(tmp_path / "run"), num_train_epochs=1, learning_rate=1e-3,
                                     lr_scheduler_type="cosine", warmup_steps=1, num_generations=4,
                                     per_device_train_batch_size=8, max_prompt_length=32, max_completion_length=6,
                                     logging_steps=1, save_steps=1, use_cpu=True, seed=1,
                                     overrides={"model.init_std": 0.15})
    trainer = compilepass.GRPOTrainer(model="tiny", reward_funcs=_length_reward, args=args,
                                      train_dataset=datasets.Dataset.from_list(rows),
                                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                      progress=False)
    try:
        assert trainer.config == to_grpo_config(dataclasses.replace(args, overrides={"model.init_std": 0.15}),
                                                num_examples=4)
        summary = trainer.train()
    finally:
        trainer.close()
    assert (summary.final_step, trainer.config.data.prompts_per_step, trainer.config.run.max_steps) == (2, 2, 2)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=2)
    expected = []
    for _ in range(2):
        opt.step()
        sched.step()
        expected.append(opt.param_groups[0]["lr"])
    assert [r["learning_rate"] for r in recs] == pytest.approx(expected, abs=1e-15)
    saved = json.loads((tmp_path / "run" / "step-00000002" / "meta.json").read_text())["config"]
    assert saved["optim"]["lr"] == 1e-3 and saved["generation"]["num_generations"] == 4
    assert (tmp_path / "run" / "adapter_config.json").is_file()


def test_apply_arguments_sets_only_the_given_fields():
    base = load_config(None, ["optim.micro_batch_size=0", "model.lora_rank=4"], base=default_config("tiny"))
    c = apply_arguments(base, {"learning_rate": 1e-5, "max_completion_length": 12, "epsilon_high": 0.28})
    assert (c.optim.lr, c.generation.max_completion_len, c.loss.epsilon_high) == (1e-5, 12, 0.28)
    rest = dataclasses.replace(c, optim=dataclasses.replace(c.optim, lr=base.optim.lr),
                               generation=dataclasses.replace(c.generation, max_completion_len=8),
                               loss=dataclasses.replace(c.loss, epsilon_high=0.2))
    assert rest == base  # nothing else moved (the automatic micro-batch, the LoRA rank)
    c = apply_arguments(base, {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4})
    assert (c.optim.micro_batch_size, c.data.prompts_per_step) == (4, 2)  # TRL's meaning: 16 completions, G=8


def test_cli_trl_flags(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["grpo", "--preset", "tiny", "--no-progress", "--learning_rate", "1e-3", f"run.output_dir={out}",
                   "--max_completion_length", "4", "--max_steps", "2", "--gradient_checkpointing", "false",
                   "data.prompts_per_step=2", "--lr_scheduler_type=linear"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((out / "step-00000002" / "meta.json").read_text())["config"]
    assert (saved["optim"]["lr"], saved["optim"]["scheduler"], saved["generation"]["max_completion_len"]) == (
        1e-3, "linear", 4)
    assert (saved["run"]["max_steps"], saved["data"]["prompts_per_step"], saved["model"]["lora_rank"]) == (2, 2, 8)
    assert [r["learning_rate"] for r in read_metrics(out / "metrics.jsonl")] == pytest.approx([5e-4, 0.0])
    capsys.readouterr()
    for argv, needle in [
        (["--learning_rate", "fast"], "grpo: argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
        (["--bf16", "true", "--eval_steps=3"], "GRPOArguments: not supported here: bf16 (the weights' dtype"),
        (["--loss_type", "sapo"], "GRPOArguments: not supported here: loss_type='sapo'"),
        (["--num_generations", "1"], "'num_generations' (generation.num_generations) must be >= 2"),
    ]:
        assert cli.main(["grpo", "--preset", "tiny", f"run.output_dir={tmp_path / 'bad'}", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)
    assert not (tmp_path / "bad").exists()

"""GRPO config: YAML / TOML loading, overrides, and one clear ConfigError per problem."""

from __future__ import annotations

import json

import pytest

from compilepass.core.errors import ConfigError
from compilepass.standby.grpo.config import GRPOConfig, RewardSpec, apply_overrides, default_config, load_config

YAML = """\
model:
  name_or_path: tiny
  lora_rank: 4
generation:
  num_generations: 4
  max_completion_len: 16
  stop: ["\\n\\n"]
optim:
  lr: 1e-4            # YAML 1.1 reads this as a string; float fields accept it
  betas: [0.9, 0.95]
  scheduler: cosine
loss:
  loss_type: dapo
  epsilon_high: 0.28
data:
  dataset: builtin:arithmetic
reward:
  functions:
    - exact_match
    - {name: format_answer_tag, weight: 0.5}
run:
  output_dir: /tmp/x
  max_steps: 10
"""

TOML = """\
[model]
name_or_path = "tiny"
lora_rank = 4

[generation]
num_generations = 4

[optim]
lr = 1e-4
max_grad_norm = 0.5

[[reward.functions]]
name = "exact_match"
weight = 2.0

[data]
dataset = "builtin:arithmetic"
"""


def test_yaml_loads(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(YAML)
    c = load_config(p)
    assert c.model.lora_rank == 4 and c.model.lora_alpha == 64  # unspecified keys keep defaults
    assert c.generation.num_generations == 4 and c.generation.stop == ["\n\n"]
    assert c.optim.lr == pytest.approx(1e-4) and c.optim.betas == [0.9, 0.95] and c.optim.scheduler == "cosine"
    assert c.loss.loss_type == "dapo" and c.loss.epsilon_high == pytest.approx(0.28)
    assert c.reward.functions == [RewardSpec("exact_match", 1.0), RewardSpec("format_answer_tag", 0.5)]
    assert c.run.max_steps == 10


def test_toml_loads(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(TOML)
    c = load_config(p)
    assert c.optim.lr == pytest.approx(1e-4) and c.optim.max_grad_norm == 0.5
    assert c.reward.functions == [RewardSpec("exact_match", 2.0)]
    assert c.data.dataset == "builtin:arithmetic"


def test_overrides_parse_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(YAML)
    c = load_config(p, ["optim.lr=3e-5", "generation.num_generations=16", "model.gradient_checkpointing=false",
                        "model.lora_targets=[q_proj, v_proj]", "optim.max_grad_norm=null", "run.resume=never",
                        "reward.functions=[exact_match]"])
    assert c.optim.lr == pytest.approx(3e-5)
    assert c.generation.num_generations == 16
    assert c.model.gradient_checkpointing is False
    assert c.model.lora_targets == ["q_proj", "v_proj"]
    assert c.optim.max_grad_norm is None
    assert c.run.resume == "never"
    assert c.reward.functions == [RewardSpec("exact_match", 1.0)]
    # overrides apply in order; the file stays untouched
    assert load_config(p, ["run.max_steps=5", "run.max_steps=7"]).run.max_steps == 7
    assert apply_overrides({}, ["run.seed=3"]) == {"run": {"seed": 3}}


def test_no_file_means_defaults_and_to_dict_round_trips():
    c = load_config(None, ["run.max_steps=3"])
    assert c.run.max_steps == 3
    d = c.to_dict()
    json.dumps(d)  # plain data
    assert GRPOConfig.from_dict(d) == c


def test_default_tiny_config_is_valid():
    c = default_config("tiny")
    assert c.model.name_or_path == "tiny" and c.run.device == "cpu"
    assert c.data.dataset == "builtin:repeat"
    assert GRPOConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown default config 'huge'; valid: tiny"):
        default_config("huge")


@pytest.mark.parametrize("override, needle", [
    ("generation.num_generations=1", "'generation.num_generations' must be >= 2"),
    ("loss.epsilon_low=-0.1", "'loss.epsilon_low' must be >= 0"),
    ("loss.epsilon_high=-1", "'loss.epsilon_high' must be >= 0"),
    ("loss.beta=-1", "'loss.beta' must be >= 0"),
    ("loss.num_iterations=0", "'loss.num_iterations' must be >= 1"),
    ("generation.gpu_memory_utilization=0", "'generation.gpu_memory_utilization' must be in (0, 1]"),
    ("generation.gpu_memory_utilization=1.2", "'generation.gpu_memory_utilization' must be in (0, 1]"),
    ("generation.top_p=0", "'generation.top_p' must be in (0, 1]"),
    ("generation.temperature=0", "'generation.temperature' must be > 0"),
    ("loss.loss_type=ppo", "'loss.loss_type' must be one of grpo, bnpo, dr_grpo, dapo, cispo (got 'ppo')"),
    ("generation.engine=sglang", "'generation.engine' must be one of native, vllm"),
    ("optim.scheduler=step", "'optim.scheduler' must be one of constant, cosine, linear"),
    ("optim.lr=0", "'optim.lr' must be > 0"),
    ("optim.lr=fast", "'optim.lr' must be a number (got 'fast')"),
    ("optim.betas=[0.9]", "'optim.betas' must be two numbers in [0, 1)"),
    ("model.dtype=int8", "'model.dtype' must be one of float32, bfloat16, float16"),
    ("model.lora_rank=2.5", "'model.lora_rank' must be an integer (got 2.5)"),
    ("model.lora_rank=0", "'model.lora_rank' must be >= 1"),
    ("model.lora_targets=q_proj", "'model.lora_targets' must be a list of strings"),
    ("run.tensorboard=maybe", "'run.tensorboard' must be true/false (got 'maybe')"),
    ("run.max_steps=true", "'run.max_steps' must be an integer (got True)"),
    ("data.prompts_per_step=0", "'data.prompts_per_step' must be >= 1"),
    ("optim.lr=.inf", "'optim.lr' must be a finite number (got inf)"),
    ("loss.epsilon_high=.inf", "'loss.epsilon_high' must be a finite number"),
    ("model.lora_targets=['']", "'model.lora_targets' module names must not be empty"),
    ("run.seed=-1", "'run.seed' must be in [0, 2**63)"),
    ("data.seed=9223372036854775808", "'data.seed' must be in [0, 2**63)"),
    ("generation.stop_token_ids=[2, -1]", "'generation.stop_token_ids' must be token ids >= 0"),
    ("data.dataset=builtin:chess", "unknown built-in task 'chess'; valid: builtin:repeat"),
    ("reward.functions=[nope]", "unknown reward 'nope'; valid: exact_match"),
    ("reward.functions=[exact_match, exact_match]", "reward 'exact_match' is listed twice"),
    ("optim.foo=1", "unknown key 'optim.foo'; valid keys of optim: lr, weight_decay"),
    ("foo.bar=1", "unknown section 'foo'; valid: model, generation, loss, optim, data, reward, run"),
    ("lr=1", "must look like section.key=value"),
    ("optim.lr", "must look like section.key=value"),
])
def test_each_problem_is_one_clear_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*missing.yaml' not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: tiny\n  lora_rank: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(bad)
    badt = tmp_path / "bad.toml"
    badt.write_text("[model]\nlora_rank = = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: .*line 2"):
        load_config(badt)
    other = tmp_path / "c.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match="unknown format '.json'"):
        load_config(other)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(notmap)


def test_file_key_errors_name_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: unknown key 'optim.learning_rate'; valid keys of optim: lr,")
    p.write_text("trainer:\n  x: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'trainer'"):
        load_config(p)
    p.write_text("generation:\n  num_generations: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: 'generation\.num_generations' must be >= 2"):
        load_config(p)
    p.write_text("reward:\n  functions:\n    - {nam: exact_match}\n")
    with pytest.raises(ConfigError, match=r"'reward\.functions\[0\]' must have a 'name'"):
        load_config(p)


def test_jsonl_dataset_needs_a_reward():
    with pytest.raises(ConfigError, match="'reward.functions' is empty; a JSONL dataset needs"):
        load_config(None, ["data.dataset=prompts.jsonl", "reward.functions=[]"])
    c = load_config(None, ["data.dataset=prompts.jsonl", "reward.functions=[mymod:score]"])
    assert c.reward.functions == [RewardSpec("mymod:score", 1.0)]  # resolved later, by RewardSet


def test_optimizer_and_scheduler_builders():
    import torch

    p = torch.nn.Parameter(torch.zeros(2))
    for kind, at_end in (("constant", 1.0), ("linear", 0.0), ("cosine", 0.0)):
        c = load_config(None, [f"optim.scheduler={kind}", "optim.warmup_steps=2", "optim.lr=0.1", "optim.betas=[0.8, 0.9]"])
        opt = c.optim.make_optimizer([p])
        assert opt.param_groups[0]["betas"] == (0.8, 0.9)
        sched = c.optim.make_scheduler(opt, max_steps=10)
        lrs = [opt.param_groups[0]["lr"]]
        for _ in range(10):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        # transformers' warmup (get_scheduler): linear from 0; "constant" keeps its warmup (constant_with_warmup)
        assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.05) and lrs[2] == pytest.approx(0.1)
        assert lrs[10] == pytest.approx(0.1 * at_end, abs=1e-12)
        if kind == "cosine":
            assert lrs[6] == pytest.approx(0.05)  # half way through the decay
    import io

    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    sched2 = c.optim.make_scheduler(c.optim.make_optimizer([p]), max_steps=10)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 10


def test_reinit_preset_weights():
    import torch

    from compilepass.core.models import build_model

    c = default_config("tiny")
    assert c.model.init_std == 0.15
    m = build_model("tiny", dtype=torch.float32)
    assert c.model.reinit_preset_weights(m, seed=0)
    w = m.model.layers[0].mlp.up_proj.weight
    assert 0.13 < w.std().item() < 0.17
    assert not load_config(None, ["model.init_std=null"]).model.reinit_preset_weights(m)
    with pytest.raises(ConfigError, match="'model.init_std' must be > 0 or null"):
        load_config(None, ["model.init_std=0"])

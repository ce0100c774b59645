"""Engine lengths past a config's max_position_embeddings (standby/rollout/vllm/positions.py) and the
one-line reason a vLLM build error gives. No vLLM needed: the vLLM-side check is in tests/vllm_env."""

from __future__ import annotations

import pydantic
import pytest
from transformers import LlamaConfig, Qwen3Config

from compilepass.core.errors import ConfigError
from compilepass.standby.rollout.vllm.engine import build_error_line
from compilepass.standby.rollout.vllm.positions import position_overrides, rope_types

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_a_length_within_the_config_needs_no_override():
    assert position_overrides(Qwen3Config(max_position_embeddings=40960), 40960) == {}


@pytest.mark.parametrize("config", [Qwen3Config(max_position_embeddings=40960),
                                    LlamaConfig(max_position_embeddings=131072, rope_parameters=LLAMA3)])
def test_length_free_rope_types_get_a_longer_table(config):
    assert position_overrides(config, 131089) == {"max_position_embeddings": 131089}


def test_a_rope_type_that_reads_the_length_is_refused_in_one_line():
    config = LlamaConfig(max_position_embeddings=4096,
                         rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    assert rope_types(config) == {"dynamic"}
    with pytest.raises(ConfigError, match="dynamic") as info:
        position_overrides(config, 8192)
    assert "\n" not in str(info.value) and "4095" in str(info.value)
    assert position_overrides(config, 4096) == {}  # within the config: nothing to change, nothing refused


def test_nested_rope_parameters_name_every_layer_types_rope():
    class Config:
        max_position_embeddings = 16
        rope_parameters = {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "yarn"}}

    assert rope_types(Config()) == {"default", "yarn"}
    with pytest.raises(ConfigError, match="yarn"):
        position_overrides(Config(), 32)


def test_a_pydantic_validation_error_gives_its_message_not_the_docs_link():
    class ModelConfig(pydantic.BaseModel):
        max_model_len: int

        @pydantic.field_validator("max_model_len")
        @classmethod
        def _check(cls, v):
            raise ValueError(f"User-specified max_model_len ({v}) is greater than the derived max_model_len")

    with pytest.raises(pydantic.ValidationError) as info:
        ModelConfig(max_model_len=131089)
    assert str(info.value).strip().splitlines()[-1].strip().startswith("For further information")  # the old line
    line = build_error_line(info.value)
    assert "131089" in line and "greater than the derived" in line and "errors.pydantic.dev" not in line
    assert build_error_line(RuntimeError("first\nthe cause\n")) == "the cause"


def test_the_kv_cache_vllm_is_given_holds_every_sequence_with_a_few_blocks_to_spare():
    import torch

    from compilepass.core.shapes import shape_for
    from compilepass.standby.rollout.vllm.engine import _kv_bytes

    shape = shape_for("llama-3.1-8b")
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 2
    need = 2 * 131_089 * per_token  # two generations of 131,072 + 16 prompt tokens + 1, bf16
    got = _kv_bytes(shape, 2, 131_089, torch.bfloat16, 128)
    assert need + 128 * per_token <= got <= need * 1.01  # a null block and per-layer flooring, not a sequence

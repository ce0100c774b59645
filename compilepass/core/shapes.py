"""Model shapes and the random-weight presets: the tuning database's model key and what the
decoder, the KV planner and the benchmarks size themselves from.

A preset is a published model's shape (its real config values) built with random weights: speed and
memory depend only on the shape, so benchmarks need no download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from compilepass.core.errors import ModelNotFoundError
from compilepass.core.hub import HubModelNotCachedError, cached_snapshot, hub_cache_dir, is_repo_id

FAMILIES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    family: str  # "llama" | "qwen2" | "qwen3"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    tie_word_embeddings: bool = False
    rope_scaling: dict | None = None  # e.g. Llama 3's {"rope_type": "llama3", "factor": 32.0, ...}
    max_position_embeddings: int = 32_768

    @classmethod
    def from_hf_config(cls, config) -> "ModelShape":
        """Read the shape from a transformers config (v5 ``rope_parameters`` or v4 ``rope_theta``)."""
        family = getattr(config, "model_type", "")
        if family not in FAMILIES:
            raise ModelNotFoundError(f"unsupported model type {family!r}; supported: {', '.join(FAMILIES)}")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10_000.0
        if not rope:  # transformers 4.x
            rope = dict(getattr(config, "rope_scaling", None) or {})
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            family=family,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(theta),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            rope_scaling=scaling,
            max_position_embeddings=config.max_position_embeddings,
        )

    def to_hf_config(self, attn_implementation: str = "sdpa"):
        """A transformers config of this shape, with no special tokens (generation runs to length)."""
        import transformers

        cls = {
            "llama": transformers.LlamaConfig,
            "qwen2": transformers.Qwen2Config,
            "qwen3": transformers.Qwen3Config,
        }[self.family]
        kwargs = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        if self.family == "qwen2":  # Qwen2 derives head_dim from hidden_size / num_heads
            if self.head_dim * self.num_heads != self.hidden_size:
                raise ValueError("qwen2 shapes need head_dim * num_heads == hidden_size")
        else:
            kwargs["head_dim"] = self.head_dim
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        if int(transformers.__version__.split(".")[0]) >= 5:
            kwargs["rope_parameters"] = rope
        else:
            kwargs["rope_theta"] = self.rope_theta
            kwargs["rope_scaling"] = self.rope_scaling
        config = cls(**kwargs)
        config._attn_implementation = attn_implementation
        return config


def _tiny(family: str, tie: bool) -> ModelShape:
    return ModelShape(
        num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
        vocab_size=256, family=family, rms_norm_eps=1e-6, rope_theta=10_000.0, tie_word_embeddings=tie,
        max_position_embeddings=2048,
    )


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


# Published config.json values of each model (random weights are used; only the shape matters).
PRESETS: dict[str, ModelShape] = {
    "tiny": _tiny("qwen3", tie=True),
    "tiny-llama": _tiny("llama", tie=False),
    "tiny-qwen2": _tiny("qwen2", tie=True),
    "qwen3-0.6b": ModelShape(28, 1024, 16, 8, 128, 3072, 151_936, "qwen3", 1e-6, 1_000_000.0, True,
                             None, 40_960),
    "qwen3-8b": ModelShape(36, 4096, 32, 8, 128, 12_288, 151_936, "qwen3", 1e-6, 1_000_000.0, False,
                           None, 40_960),
    "qwen3-32b": ModelShape(64, 5120, 64, 8, 128, 25_600, 151_936, "qwen3", 1e-6, 1_000_000.0, False,
                            None, 40_960),
    "llama-3.2-1b": ModelShape(16, 2048, 32, 8, 64, 8192, 128_256, "llama", 1e-5, 500_000.0, True,
                               _llama3_rope(32.0), 131_072),
    "llama-3.1-8b": ModelShape(32, 4096, 32, 8, 128, 14_336, 128_256, "llama", 1e-5, 500_000.0, False,
                               _llama3_rope(8.0), 131_072),
}


def model_not_found(name) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {str(name)!r} is neither a preset ({', '.join(PRESETS)}) nor a local Hugging Face model directory"
    )


def resolve_model_source(name_or_path: str | Path, cache_dir: Optional[str] = None) -> str:
    """"preset", "directory" or "hub" (a Hub id whose snapshot is in the local Hugging Face cache);
    raises ModelNotFoundError (one line) for anything else: see :func:`local_model_path`."""
    name = str(name_or_path)
    if name in PRESETS:
        return "preset"
    if (Path(name) / "config.json").is_file():
        return "directory"
    local_model_path(name, cache_dir)  # raises unless the cache holds it
    return "hub"


def local_model_path(name_or_path: str | Path, cache_dir: Optional[str] = None) -> str:
    """What to load for ``name_or_path``: the preset name itself, a local directory, or, for a Hub
    id (``org/name``), its snapshot directory in the local Hugging Face cache (``cache_dir``, else
    huggingface_hub's default; never downloaded). Raises ModelNotFoundError (one line) when it is
    none of these: a Hub id missing from the cache is a
    :class:`~compilepass.core.hub.HubModelNotCachedError` naming the id and the cache directory."""
    name = str(name_or_path)
    if name in PRESETS:
        return name
    if (Path(name) / "config.json").is_file():
        return name
    if Path(name).expanduser().exists() or not is_repo_id(name):
        raise model_not_found(name)
    snapshot = cached_snapshot(name, cache_dir)
    if snapshot is None:
        raise HubModelNotCachedError(
            f"model {name!r} is not a preset ({', '.join(PRESETS)}) or a local directory, and the Hugging Face "
            f"cache {str(hub_cache_dir(cache_dir))!r} holds no snapshot of it; runs do not download: fetch it "
            f"first (hf download {name})")
    return str(snapshot)


def shape_for(model: str, cache_dir: Optional[str] = None) -> ModelShape:
    """ModelShape of a preset name, a local Hugging Face directory or a cached Hub id."""
    if model in PRESETS:
        return PRESETS[model]
    path = local_model_path(model, cache_dir)  # ModelNotFoundError, one line
    from transformers import AutoConfig  # heavy: only for a model directory

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(path, local_files_only=True))


def causal_lm_of(model):
    """The transformers causal LM inside ``model`` (a peft model's base model, else ``model``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model

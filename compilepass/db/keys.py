"""The database's key: environment, model signature, workload kind, size bucket, engine, policy.

An entry id is a short stable hash of its key (:meth:`TuneKey.entry_id`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Union

from compilepass.core.env import EnvironmentKey
from compilepass.core.shapes import FAMILIES, ModelShape


@dataclass(frozen=True)
class ModelSignature:
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    dtype: str
    head_dim: Optional[int] = None
    intermediate_size: Optional[int] = None
    #: The base weights' quantization: None for 16/32-bit weights (``dtype`` is what they hold),
    #: ``"nf4-dq"`` for QLoRA's 4-bit NF4 with double quantization (``dtype`` is then the compute
    #: dtype; :func:`compilepass.core.quantize.quant_of`). Entries of one quantization never apply
    #: to a model of another (:func:`compilepass.db.lookup.lookup`). Left out of the stored key when
    #: None, so entries written before the field keep their ids.
    quant: Optional[str] = None

    @classmethod
    def from_shape(cls, shape, dtype: str, quant: Optional[str] = None) -> "ModelSignature":
        return cls(family=shape.family, num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                   num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, vocab_size=shape.vocab_size,
                   dtype=dtype_name(dtype), head_dim=shape.head_dim, intermediate_size=shape.intermediate_size,
                   quant=quant)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelSignature":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    @classmethod
    def from_hf_config(cls, config, dtype: str, quant: Optional[str] = None) -> "ModelSignature":
        """The signature of any transformers causal LM config. The families the tuner measures
        (:data:`~compilepass.core.shapes.FAMILIES`) read through :class:`ModelShape`, as the tuner
        keys them; any other family from the config's standard attribute names (``attribute_map``
        covers GPT-2's ``n_layer`` etc.). ValueError (one line) when a size is missing."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "model_type", "") in FAMILIES:
            return cls.from_shape(ModelShape.from_hf_config(text), dtype, quant)
        names = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
                 "num_heads": "num_attention_heads", "vocab_size": "vocab_size"}
        sizes = {field_: getattr(text, attr, None) for field_, attr in names.items()}
        missing = [names[k] for k, v in sizes.items() if not isinstance(v, int) or v < 1]
        if missing:
            raise ValueError(f"{type(config).__name__} has no {', '.join(missing)}")
        inter = next((v for v in (getattr(text, a, None) for a in ("intermediate_size", "n_inner", "ffn_dim"))
                      if isinstance(v, int)), None)
        head_dim = getattr(text, "head_dim", None)
        return cls(family=getattr(text, "model_type", "") or type(config).__name__, dtype=dtype_name(dtype),
                   num_kv_heads=getattr(text, "num_key_value_heads", None) or sizes["num_heads"],
                   head_dim=head_dim if isinstance(head_dim, int) else sizes["hidden_size"] // sizes["num_heads"],
                   intermediate_size=inter, quant=quant, **sizes)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["quant"] is None:  # a 16-bit model's key (and entry id) as before the field existed
            del d["quant"]
        return d

    def parameters(self) -> int:
        """Parameter count estimated from the shape (embedding + layers; norms ignored)."""
        head_dim = self.head_dim or self.hidden_size // self.num_heads
        inter = self.intermediate_size or 4 * self.hidden_size
        attn = self.hidden_size * head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * inter
        return self.vocab_size * self.hidden_size + self.num_layers * (attn + mlp)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class TuneKey:
    """What a measurement depends on. ``vllm`` only counts for engine "vllm"."""

    torch: str
    triton: Optional[str]
    vllm: Optional[str]
    cuda: Optional[str]
    device_name: str
    compute_capability: Optional[str]
    model: ModelSignature
    engine: str
    workload: str
    bucket: str
    policy: str = "balanced"

    @classmethod
    def build(cls, env: Union[EnvironmentKey, Mapping], model: ModelSignature, workload: str, bucket: str,
              engine: str = "native", policy: str = "balanced") -> "TuneKey":
        e = env.to_dict() if isinstance(env, EnvironmentKey) else dict(env)
        return cls(torch=e["torch"], triton=e.get("triton"), vllm=e.get("vllm"), cuda=e.get("cuda"),
                   device_name=e["device_name"], compute_capability=e.get("compute_capability"), model=model,
                   engine=engine, workload=workload, bucket=bucket, policy=policy)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TuneKey":
        d = dict(d)
        d["model"] = ModelSignature.from_dict(d["model"])
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    def entry_id(self) -> str:
        d = self.to_dict()
        if self.engine != "vllm":
            d["vllm"] = None  # the native engine does not depend on vLLM
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def torch_minor(self) -> str:
        return torch_minor(self.torch)

    @property
    def arch(self) -> str:
        return arch_of(self.compute_capability)

    def same_environment(self, other: "TuneKey") -> bool:
        fields = ["torch", "triton", "cuda", "device_name", "compute_capability"]
        if self.engine == "vllm":
            fields.append("vllm")
        return all(getattr(self, f) == getattr(other, f) for f in fields)


def torch_minor(version: str) -> str:
    return ".".join(str(version).split("+")[0].split(".")[:2])


def arch_of(compute_capability: Optional[str]) -> str:
    return f"sm{str(compute_capability).split('.')[0]}" if compute_capability else "cpu"


def parse_bucket(bucket: str) -> dict[str, int]:
    """``"b32-p128-n256"`` -> ``{"b": 32, "p": 128, "n": 256}`` (unknown parts are skipped)."""
    out = {}
    for part in str(bucket).split("-"):
        if len(part) >= 2 and part[0].isalpha() and part[1:].isdigit():
            out[part[0]] = int(part[1:])
    return out


def bucket_distance(query: Mapping[str, Optional[int]], bucket: str) -> Optional[float]:
    """Sum of |log2| ratios over the dimensions the query knows; None if the entry lacks one."""
    have = parse_bucket(bucket)
    total = 0.0
    for name, value in query.items():
        if value is None:
            continue
        if name not in have or have[name] < 1 or value < 1:
            return None
        total += abs(math.log2(value / have[name]))
    return total


def bucket_within(query: Mapping[str, Optional[int]], bucket: str, factor: float) -> bool:
    have = parse_bucket(bucket)
    for name, value in query.items():
        if value is None:
            continue
        if name not in have or abs(math.log2(value / have[name])) > math.log2(factor) + 1e-9:
            return False
    return True


def bucket_dims(kind: str, batch=None, prompt_len=None, new_tokens=None, seq_len=None, lora_rank=None) -> dict:
    """The size dimensions of a workload kind (None = unknown), named as in ``WorkloadSpec.size_bucket``."""
    if kind == "rollout":
        return {"b": batch, "p": prompt_len, "n": new_tokens}
    if kind == "train":
        return {"b": batch, "t": seq_len, "r": lora_rank}
    return {"b": batch}


def bucket_string(dims: Mapping[str, Optional[int]]) -> Optional[str]:
    if any(v is None for v in dims.values()):
        return None
    return "-".join(f"{k}{v}" for k, v in dims.items())



"""What the tuner measures and the database keys on: one workload (kind, model, sizes, engine).

Plain data: the tuner runs it (:mod:`compilepass.tuning.workloads`), the database reads its kind
and size bucket.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from compilepass.core.checks import check_int
from compilepass.core.errors import ConfigError

#: Rollout engines: the workload's ``engine`` and a database key's.
ENGINES = ("native", "vllm")
#: Decision policies a tune result is verified and recorded under (``--policy``).
POLICIES = ("balanced", "throughput")
WORKLOAD_KINDS = ("rollout", "train", "mlp")
#: The name of the only quantization compilepass builds: NF4 codes, blocks of 64, double-quantized
#: scales. The tuning database keys 4-bit entries by it (16-bit entries have no quant).
NF4_DQ = "nf4-dq"


@dataclass
class WorkloadSpec:
    kind: str = "rollout"
    model: str = "tiny"
    batch: int = 8
    prompt_len: int = 16
    new_tokens: int = 16
    seq_len: int = 128  # train
    lora_rank: int = 16
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    seed: int = 0
    engine: str = "native"  # rollout only: "vllm" measures vLLM's generation
    load_in_4bit: bool = False  # a QLoRA base (NF4, double quantization): entries keyed ModelSignature.quant

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorkloadSpec":
        return cls(**d)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # heavy: only when asked

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self):
        import torch  # heavy: only when asked

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)

    def quant(self):
        """The database key's quantization of this workload's model: ``NF4_DQ`` or None (16-bit)."""
        return NF4_DQ if self.load_in_4bit else None

    def size_bucket(self) -> str:
        if self.kind == "rollout":
            return f"b{self.batch}-p{self.prompt_len}-n{self.new_tokens}"
        if self.kind == "train":
            return f"b{self.batch}-t{self.seq_len}-r{self.lora_rank}"
        return f"b{self.batch}"

    def validate(self) -> None:
        """The checks that need no engine: kind, engine name, sizes (ConfigError, one line). The
        tuner adds vLLM's own preflight for ``engine="vllm"``."""
        if self.kind not in WORKLOAD_KINDS:
            raise ConfigError(f"unknown workload {self.kind!r}; choose one of {', '.join(WORKLOAD_KINDS)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; choose native or vllm")
        if self.engine == "vllm" and self.kind != "rollout":
            raise ConfigError(f"--engine vllm measures generation: use --workload rollout (got {self.kind})")
        if self.load_in_4bit and self.engine == "vllm":
            raise ConfigError("--load-in-4bit measures the native engine (the vLLM engine does not share a 4-bit "
                              "base); use --engine native")
        if self.load_in_4bit and self.kind == "mlp":
            raise ConfigError("--load-in-4bit needs a model workload (rollout or train), not mlp")
        for name in ("batch", "prompt_len", "new_tokens", "seq_len", "lora_rank"):
            check_int("--" + name.replace("_", "-"), getattr(self, name), 1)

"""Workloads the tuner measures: what GRPO does with a compiled model.

- ``rollout``: batched autoregressive decode (B sequences, prompt P, N new tokens) through the native
  engine's static-KV decode step (:mod:`compilepass.standby.decode`), over the model's own modules.
- ``train``: forward + backward of the model with a peft LoRA adapter (B x T tokens).
- ``mlp``: a two-layer MLP block, the cheapest real compile; for tests and quick checks of the
  tuner's machinery, not for tuning models.

Each workload builds its inputs once (``prepare``) and then makes one :class:`Runner` per flag set.
A runner's ``first_calls`` runs the compiled code until it is compiled and captured (compile time);
``unit`` runs one measured unit of work and returns the number of tokens it processed.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

WORKLOAD_KINDS = ("rollout", "train", "mlp")


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
    engine: str = "native"  # rollout only: "vllm" measures vLLM's generation (compilepass.vllm_workload)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorkloadSpec":
        return cls(**d)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)

    def size_bucket(self) -> str:
        if self.kind == "rollout":
            return f"b{self.batch}-p{self.prompt_len}-n{self.new_tokens}"
        if self.kind == "train":
            return f"b{self.batch}-t{self.seq_len}-r{self.lora_rank}"
        return f"b{self.batch}"

    def validate(self) -> None:
        from .errors import ConfigError

        if self.kind not in WORKLOAD_KINDS:
            raise ConfigError(f"unknown workload {self.kind!r}; choose one of {', '.join(WORKLOAD_KINDS)}")
        if self.engine not in ("native", "vllm"):
            raise ConfigError(f"unknown engine {self.engine!r}; choose native or vllm")
        if self.engine == "vllm" and self.kind != "rollout":
            raise ConfigError(f"--engine vllm measures generation: use --workload rollout (got {self.kind})")
        if self.engine == "vllm":
            from .vllm_workload import preflight

            preflight(self)  # vLLM importable and not refused, the model's shape runnable by it
        for name in ("batch", "prompt_len", "new_tokens", "seq_len", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


class HasWorkloadSpec:
    """JSON round trip for dataclasses whose ``workload`` field is a :class:`WorkloadSpec`
    (the payloads handed to isolated child processes)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["workload"] = self.workload.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        d["workload"] = WorkloadSpec.from_dict(d["workload"])
        return cls(**d)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """One compiled variant of a workload."""

    def __init__(self, step: Callable[[], Any], unit: Callable[[], int], device: str, n_first_calls: int = 3):
        self._step = step
        self._unit = unit
        self.device = device
        self.n_first_calls = n_first_calls

    def first_calls(self) -> None:
        for _ in range(self.n_first_calls):
            self._step()
        synchronize(self.device)

    def unit(self) -> int:
        tokens = self._unit()
        synchronize(self.device)
        return tokens


class Workload(abc.ABC):
    def __init__(self, spec: WorkloadSpec):
        self.spec = spec

    @abc.abstractmethod
    def prepare(self) -> None:
        """Build the model and inputs (not timed)."""

    @abc.abstractmethod
    def runner(self, options: Optional[dict]) -> Runner:
        """A compiled variant of this workload with the given Inductor options."""

    def describe(self) -> dict:
        return {}


def inductor_options_for_torch(options: Optional[dict]) -> dict:
    """Options as torch.compile wants them: JSON has no tuples, Inductor's tuple options need them."""
    import torch._inductor.config as inductor_config

    current = inductor_config.get_config_copy()
    out = {}
    for name, value in (options or {}).items():
        if isinstance(value, list) and isinstance(current.get(name), tuple):
            value = tuple(value)
        out[name] = value
    return out


def _compile(fn, options: Optional[dict], fullgraph: bool = True):
    import torch

    return torch.compile(fn, options=inductor_options_for_torch(options), fullgraph=fullgraph, dynamic=False)


def _uses_cudagraphs(options: Optional[dict]) -> bool:
    return bool((options or {}).get("triton.cudagraphs", False))


class RolloutWorkload(Workload):
    """Greedy generation with the native rollout engine (:class:`compilepass.standby.engine.RolloutEngine`):
    the flags compile the engine's decode step, which the engine replays under its own CUDA graph
    (on CUDA). Compile time = engine construction (KV cache, compile, graph capture) + the first
    calls; throughput = batch x new_tokens tokens per ``generate`` (prefill included), as a GRPO
    rollout sees it. ``triton.cudagraphs`` is forced off inside the engine (it captures its own
    graphs), so the tuner leaves that option out of this workload's space."""

    def prepare(self) -> None:
        import torch

        from compilepass.standby.models import ModelShape, build_model

        s = self.spec
        self.device = s.resolved_device()
        self.dtype = s.resolved_dtype()
        self.model = build_model(s.model, dtype=self.dtype, device=self.device, seed=s.seed)
        self.shape = ModelShape.from_hf_config(self.model.config)
        g = torch.Generator(device="cpu").manual_seed(s.seed)
        self.prompts = torch.randint(3, self.shape.vocab_size, (s.batch, s.prompt_len), generator=g).tolist()
        self.engines = []  # one per runner; verification keeps several alive side by side

    def runner(self, options: Optional[dict]) -> Runner:
        import torch

        from compilepass.standby.engine import RolloutEngine

        s = self.spec
        engine = RolloutEngine(self.model, max_batch=s.batch, max_len=s.prompt_len + s.new_tokens,
                               compile_options=dict(options or {}), batch_buckets=[s.batch], dynamic_batch=False,
                               pad_token_id=0)
        self.engines.append(engine)
        tokens = torch.full((s.batch,), 3, dtype=torch.long, device=self.device)
        positions = torch.full((s.batch,), s.prompt_len, dtype=torch.long, device=self.device)

        def step():
            engine.decode(tokens, positions)

        def unit() -> int:
            out = engine.generate(self.prompts, max_new_tokens=s.new_tokens, temperature=0)
            return int(out.completion_lengths.sum())

        return Runner(step, unit, self.device)

    def describe(self) -> dict:
        d = {"model_shape": asdict(self.shape), "max_len": self.spec.prompt_len + self.spec.new_tokens,
             "engine": "native RolloutEngine (own CUDA graphs on CUDA)"}
        if self.engines:  # the engine's own defaults, as a GRPO run uses them
            e = self.engines[0]
            d["engine_options"] = {"compile_scope": e.compile_scope, "attention": e.attention,
                                   "fused_projections": e.fused_projections, "graph_sampling": e.graph_sampling,
                                   "cuda_graphs": e.use_cuda_graphs}
        return d


class TrainWorkload(Workload):
    """Forward + backward of the model with a LoRA adapter (the GRPO policy update's compute)."""

    def prepare(self) -> None:
        import torch

        from compilepass.standby.models import ModelShape, add_lora, build_model

        s = self.spec
        self.device = s.resolved_device()
        dtype = s.resolved_dtype()
        base = build_model(s.model, dtype=dtype, device=self.device, seed=s.seed)
        self.shape = ModelShape.from_hf_config(base.config)
        self.model = add_lora(base, rank=s.lora_rank, alpha=2 * s.lora_rank, seed=s.seed)
        self.model.train()
        g = torch.Generator(device="cpu").manual_seed(s.seed)
        ids = torch.randint(0, self.shape.vocab_size, (s.batch, s.seq_len + 1), generator=g).to(self.device)
        self.inputs, self.labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def runner(self, options: Optional[dict]) -> Runner:
        import torch
        import torch.nn.functional as F

        model = self.model

        def loss_fn(inputs, labels):
            logits = model(input_ids=inputs, use_cache=False).logits
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

        compiled = _compile(loss_fn, options, fullgraph=False)
        mark = _uses_cudagraphs(options)

        def step():
            if mark:
                torch.compiler.cudagraph_mark_step_begin()
            loss = compiled(self.inputs, self.labels)
            loss.backward()
            model.zero_grad(set_to_none=True)

        def unit() -> int:
            step()
            return self.spec.batch * self.spec.seq_len

        return Runner(step, unit, self.device)

    def describe(self) -> dict:
        return {"model_shape": asdict(self.shape), "lora_rank": self.spec.lora_rank}


class MLPWorkload(Workload):
    """A two-layer MLP block: a real compile that takes seconds, not minutes."""

    def prepare(self) -> None:
        import torch

        s = self.spec
        self.device = s.resolved_device()
        dtype = s.resolved_dtype()
        g = torch.Generator(device="cpu").manual_seed(s.seed)
        hidden = 64
        self.x = torch.randn(s.batch, hidden, generator=g).to(self.device, dtype)
        self.w1 = torch.randn(hidden, 4 * hidden, generator=g).to(self.device, dtype) / 8
        self.w2 = torch.randn(4 * hidden, hidden, generator=g).to(self.device, dtype) / 16

    def runner(self, options: Optional[dict]) -> Runner:
        import torch

        def block(x, w1, w2):
            h = torch.nn.functional.silu(x @ w1) @ w2
            return torch.nn.functional.rms_norm(x + h, (x.shape[-1],))

        compiled = _compile(block, options)

        def step():
            with torch.no_grad():
                compiled(self.x, self.w1, self.w2)

        def unit() -> int:
            for _ in range(16):
                step()
            return 16 * self.spec.batch

        return Runner(step, unit, self.device)


def make_workload(spec: WorkloadSpec) -> Workload:
    spec.validate()
    if spec.engine == "vllm":
        from .vllm_workload import VllmRolloutWorkload

        return VllmRolloutWorkload(spec)
    return {"rollout": RolloutWorkload, "train": TrainWorkload, "mlp": MLPWorkload}[spec.kind](spec)

"""Workloads the tuner measures: what GRPO does with a compiled model.

- ``rollout``: batched autoregressive decode (B sequences, prompt P, N new tokens) through the native
  engine's static-KV decode step (:mod:`compilepass.standby.rollout.decode`), over the model's own modules.
- ``train``: forward + backward of the model with a peft LoRA adapter (B x T tokens).
- ``mlp``: a two-layer MLP block, the cheapest real compile; for tests and quick checks of the
  tuner's machinery, not for tuning models.

Each workload builds its inputs once (``prepare``) and then makes one :class:`Runner` per flag set.
A runner's ``first_calls`` runs the compiled code until it is compiled and captured (compile time);
``unit`` runs one measured unit of work and returns the number of tokens it processed.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

from compilepass.core.shapes import ModelShape
from compilepass.core.workload_spec import WorkloadSpec
from compilepass.flags import inductor_options_for_torch
from compilepass.tuning.vllm_workload import VllmRolloutWorkload, preflight
from compilepass.tuning.workload_base import Runner, Workload


def validate_workload(spec: WorkloadSpec) -> None:
    """``spec.validate()`` and, for ``engine="vllm"``, vLLM's preflight (importable, not refused,
    the model's shape runnable by it)."""
    spec.validate()
    if spec.engine == "vllm":
        preflight(spec)


def _compile(fn, options: Optional[dict], fullgraph: bool = True):
    import torch

    return torch.compile(fn, options=inductor_options_for_torch(options), fullgraph=fullgraph, dynamic=False)


def _uses_cudagraphs(options: Optional[dict]) -> bool:
    return bool((options or {}).get("triton.cudagraphs", False))


class RolloutWorkload(Workload):
    """Greedy generation with the native rollout engine (:class:`compilepass.standby.rollout.engine.RolloutEngine`):
    the flags compile the engine's decode step, which the engine replays under its own CUDA graph
    (on CUDA). Compile time = engine construction (KV cache, compile, graph capture) + the first
    calls; throughput = batch x new_tokens tokens per ``generate`` (prefill included), as a GRPO
    rollout sees it. ``triton.cudagraphs`` is forced off inside the engine (it captures its own
    graphs), so the tuner leaves that option out of this workload's space."""

    def prepare(self) -> None:
        import torch

        from compilepass.core.models import build_model  # torch, transformers: in the trial process only

        s = self.spec
        self.device = s.resolved_device()
        self.dtype = s.resolved_dtype()
        self.model = build_model(s.model, dtype=self.dtype, device=self.device, seed=s.seed,
                                 load_in_4bit=s.load_in_4bit)  # 4-bit: the engine's NF4 path
        self.shape = ModelShape.from_hf_config(self.model.config)
        g = torch.Generator(device="cpu").manual_seed(s.seed)
        self.prompts = torch.randint(3, self.shape.vocab_size, (s.batch, s.prompt_len), generator=g).tolist()
        self.engines = []  # one per runner; verification keeps several alive side by side

    def runner(self, options: Optional[dict]) -> Runner:
        import torch

        from compilepass.standby.rollout.engine import RolloutEngine  # torch: in the trial process only

        s = self.spec
        engine = RolloutEngine(self.model, max_batch=s.batch, max_len=s.prompt_len + s.new_tokens,
                               compile_options=dict(options or {}), batch_buckets=[s.batch], dynamic_batch=False,
                               pad_token_id=0, persistent_compile=False)  # a trial must compile, never load
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

        from compilepass.core.models import add_lora, build_model  # torch, peft: in the trial process only

        s = self.spec
        self.device = s.resolved_device()
        dtype = s.resolved_dtype()
        base = build_model(s.model, dtype=dtype, device=self.device, seed=s.seed, load_in_4bit=s.load_in_4bit)
        if s.load_in_4bit:  # QLoRA as the trainer runs it: a frozen NF4 base under the adapter
            from compilepass.core.quantize import prepare_4bit_for_training

            base = prepare_4bit_for_training(base)
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
    validate_workload(spec)
    if spec.engine == "vllm":
        return VllmRolloutWorkload(spec)
    return {"rollout": RolloutWorkload, "train": TrainWorkload, "mlp": MLPWorkload}[spec.kind](spec)

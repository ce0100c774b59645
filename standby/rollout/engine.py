"""The native rollout engine: batched sampling with the trainer's own model objects.

``RolloutEngine`` generates with the very modules the optimizer updates (a transformers Llama /
Qwen2 / Qwen3 causal LM, optionally peft-wrapped): no weight copy, no sync, no LoRA merge (unless
``merge_lora``: merged for each generation, the base restored bitwise after). Its KV
cache lives in a :class:`~compilepass.standby.memory.KVRegion`
(:mod:`~compilepass.standby.rollout.kv_cache`), so ``sleep()`` gives the cache's physical memory
to the trainer and ``wake()`` maps it back at the same addresses.

Decode runs ``Decoder.decode_step`` compiled by ``torch.compile`` (Inductor's own CUDA graphs
off) and, on CUDA, captured by us (:mod:`~compilepass.standby.rollout.capture`) into one
``torch.cuda.CUDAGraph`` per batch-size bucket (2, 4, 8, ..., max_batch) over static token /
position buffers. A graph reads the weights and the KV cache at fixed addresses, so it stays valid
across sleep/wake cycles (the region's addresses never move) and optimizer steps (parameters are
updated in place). It does not survive a parameter being *replaced* (``param.data = ...``,
re-loading a state dict by assignment, moving the model): build a new engine then.

One generate loop: prefill, then per decode step either one replay of the step + sampler graph
(``graph_sampling``) or the step (its logits-only graph, or the compiled step) followed by the same
sampler run eagerly; either way each column is written into the same static buffers. Sampling
(temperature, top-k, top-p, stop tokens; :mod:`~compilepass.standby.rollout.sampling`) is
reproducible: a seed gives the same tokens. Speed options, each measured side by side
(``benchmarks/bench_rollout.py --variants``; the defaults are the fastest configuration that meets
the cold-start target, see :class:`RolloutEngine`): ``fused_projections``, ``attention``,
``graph_sampling`` and ``compile_scope``. Usage in a GRPO loop::

    engine = RolloutEngine(policy, max_batch=64, max_len=prompt_len + completion_len)
    for step in range(steps):
        engine.wake()
        out = engine.generate(prompts, max_new_tokens=256, temperature=1.0, eos_token_id=eos, seed=step)
        engine.sleep()                 # the KV memory goes to the trainer
        loss = grpo_loss(policy, out)  # the same modules, LoRA params updated in place
        loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from compilepass.core.shapes import ModelShape, causal_lm_of
from compilepass.kernels._triton_support import triton_available
from compilepass.kernels.decode_attention import supported as triton_attention_supports
from compilepass.selection import select
from compilepass.standby.rollout.backend import RolloutOutput, check_generate_args
from compilepass.standby.rollout.capture import Captured, capture_graphs
from compilepass.standby.rollout.compile import (FlagResolver, compile_limits, make_decode_step, resolve_options,
                                                 resolve_persist_dir, start_compile_workers)
from compilepass.standby.rollout.decode import Decoder
from compilepass.standby.rollout.kv_cache import build_kv_cache, kv_cache_specs
from compilepass.standby.rollout.linear4bit import model_has_4bit
from compilepass.standby.rollout.lora_merge import LoraMerge
from compilepass.standby.rollout.modes import eval_mode
from compilepass.standby.rollout.persistent_compile import PersistentCompile
from compilepass.standby.rollout.sampling import MAX_GRAPH_STOPS, post_function, sample_tokens, sampler_key

log = logging.getLogger(__name__)

__all__ = ["RolloutEngine", "RolloutOutput", "check_generate_args", "default_attention", "default_buckets",
           "kv_cache_specs", "sample_tokens", "sampler_key"]

#: How often (in decode steps) generate() syncs to see whether every sequence has stopped.
STOP_CHECK_EVERY = 8


def default_buckets(max_batch: int) -> list[int]:
    """2, 4, 8, ... below ``max_batch``, and ``max_batch`` itself ([1] when max_batch is 1).

    No bucket 1: dynamo specializes size-1 dimensions, so batch 1 would cost a compile of its own,
    while padding it to 2 costs next to nothing (decode reads the weights once either way).
    """
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    if max_batch == 1:
        return [1]
    out = [1 << i for i in range(1, max_batch.bit_length()) if (1 << i) < max_batch]
    return out + [max_batch]


def default_attention(device: torch.device, head_dim: int) -> str:
    """``attention="auto"``: the split-sequence Triton kernel on CUDA (power-of-two head sizes),
    else the two-matmul path (CPU: the kernel would run in the Triton interpreter)."""
    if device.type != "cuda":
        return "matmul"
    return "triton" if triton_available() and triton_attention_supports(head_dim) else "matmul"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class _Sampler:
    """How a generate call samples. ``in_graph``: the graph-sampling path (the (bucket, key) graphs
    and compiled samplers, noise from the engine's generator, ``stops`` its fixed-size -1-padded
    buffer); else the step replays the logits-only graph (or runs eagerly) and the sampler runs
    eagerly after it, noise from ``generator`` (None: torch's global one), ``stops`` [S] any S."""

    key: tuple
    in_graph: bool
    generator: Optional[torch.Generator]
    stops: torch.Tensor


#: the positions, in a post function's arguments, of the tensors whose dim 0 is the batch: logits, noise,
#: ids, mask, lps, slps, finished, tokens (not stops, step, temperature, pad)
POST_BATCH_ARGS = (0, 2, 3, 4, 5, 6, 7, 10)


class RolloutEngine:
    """Generate with ``model`` (the trainer's own objects) from a static, standby KV cache.

    ``RolloutEngine(model, max_batch, max_len, *, dtype=None, device=None, compile_options="auto",
    batch_buckets=None, use_cuda_graphs=True, kv_region=True, pad_token_id=None)``

    - ``max_batch``: sequences decoded at once (larger ``generate`` calls are split);
      ``max_len``: prompt + completion tokens per sequence.
    - ``dtype`` / ``device`` of the KV cache: default the model's.
    - ``compile_options``: Inductor options for the decode step; ``"auto"`` (default) = the flags
      ``compilepass.select`` returns for this model (workload "rollout"; the tuning database,
      ``COMPILEPASS_AUTOTUNE=0`` turns it off), None = torch's defaults, ``False`` = eager (no
      compile), a dict = these options. ``flag_resolver``: what "auto" asks (default
      :func:`compilepass.select`; the engine never imports the tuner).
      ``triton.cudagraphs`` is forced off when the engine captures graphs itself.
    - ``batch_buckets``: batch sizes with a compiled step and a graph (default 2, 4, 8, ...,
      max_batch; see :func:`default_buckets`); a batch runs in the smallest bucket that holds it
      (padded).
    - ``use_cuda_graphs``: capture one CUDA graph per bucket (CUDA only; ignored on CPU).
    - ``kv_region``: put the cache in a :class:`KVRegion` (sleep/wake release/restore its
      memory); False allocates ordinary tensors (sleep/wake then only flip the state).
    - ``warmup``: compile (and capture) every bucket now (default); else on first use.
    - ``dynamic_batch``: compile the step once with a symbolic batch dimension for every bucket
      >= 2 (a bucket 1, if asked for, is compiled on its own: dynamo specializes size 1) instead
      of once per bucket: cold start is one compile, not len(buckets). If that compile fails,
      the engine falls back to one static compile per bucket (logged).

    - ``fused_projections``: q/k/v and gate/up run as one GEMM each, over fused weight tensors that
      the model's own parameters are re-pointed into (still one copy; see
      :func:`~compilepass.standby.rollout.decode.fuse_projections`; off by itself for a 4-bit base,
      whose projections run :func:`~compilepass.standby.rollout.linear4bit.linear_4bit`). Default on: on an H100 it took the
      qwen3-0.6b decode step (batch 32) from 2.556 to 2.114 ms (benchmarks/results/
      rollout_variants_qwen3-0.6b_qwen3-8b_h100_2026-11-26.json).
    - ``compile_prefill``: compile the prefill too (regionally, batch and prompt length symbolic;
      :meth:`~compilepass.standby.rollout.decode.Decoder.compile_prefill`), with the decode step's
      options, on the first ``generate`` (not at start). Default off: not yet timed on a GPU.
    - ``pack_lora`` (with fused projections): each group's LoRA adapters (one per member, as GRPO
      has) run as two GEMMs over packed copies (A stacked, B block-diagonal) that each ``generate``
      and ``decode`` refreshes in place, instead of a cat, an A GEMM and one B GEMM per member
      (:class:`~compilepass.standby.rollout.fused.PackedLoRA`). Default on: on the H200 (batch 64, r=32)
      3.583 ms per decode step against 3.811 ms per member (rollout_lora_packed_h200_2026-12-03.json).
    - ``merge_lora``: each ``generate`` runs with the LoRA adapters merged into the base weights and
      restores the base bitwise from a host copy afterwards
      (:class:`~compilepass.standby.rollout.lora_merge.LoraMerge`): a decode step then runs no LoRA
      GEMM at all, for one host-to-device copy of the LoRA layers' base weights per ``generate``. The
      graphs are captured merged; :meth:`decode` runs inside ``with engine.lora_merged():``. Not for a
      4-bit base. Default off: not yet timed on a GPU.
    - ``attention``: decode attention, "auto" (default: "triton" on CUDA for power-of-two head
      sizes, else "matmul"), "matmul", "sdpa", "sdpa_gqa" or "triton" (the split-sequence kernel
      of :mod:`compilepass.kernels.decode_attention`, which reads each sequence's cache only up to
      its position; see ``Decoder``).
    - ``graph_sampling``: sampling (argmax / exponential race with noise drawn inside the graph
      from the engine's own generator, top-k / top-p), the sampled token's log-prob and the
      stop / pad bookkeeping run inside the decode step's CUDA graph: a decode step is one graph
      replay, the [B, V] logits never leave it. Default (None): on wherever the engine captures
      CUDA graphs. ``sampling_modes``: the samplers captured at warm-up ("greedy", "sample" =
      temperature only); others (top-k / top-p settings) are captured on first use.
    - ``compile_scope``: "layer" (default) compiles one decoder layer once and runs it for every
      layer (regional compilation: a cold start traces one layer, not all of them); "step"
      compiles the whole decode step as one graph (cross-layer fusion: a little faster per step,
      several times the cold start). Under CUDA graphs the eager glue between layers costs no
      launch overhead.
    - ``compile_backend``: torch.compile's backend, "inductor" (default); dynamo's "eager" traces
      and guards as Inductor would but generates no kernels (the CPU tests use it for speed).
    - ``persistent_compile``: with the layer scope and Inductor, keep the compiled layer on disk
      (torch's AOT precompile, :mod:`~compilepass.standby.rollout.persistent_compile`) so that a
      later process loads it instead of tracing it again. None (default): on where this torch has
      the API and ``COMPILEPASS_PRECOMPILE`` is not "0", in ``<cache dir>/precompiled``; False: off;
      a path: that directory.

    The defaults are the fastest measured configuration that also meets the cold-start target: on
    an H100 (qwen3-0.6b, batch 32, prompt 128, 256 new tokens) fused + triton + graph sampling +
    layer scope took 2.003 ms per decode step, 15,171 tok/s, 3.07x transformers' static-cache
    ``generate`` in the same run, with a 9.1 s cold start; the same with ``compile_scope="step"``
    took 1.914 ms per step but 45.0 s to start (benchmarks/results/
    rollout_triton_qwen3-0.6b_qwen3-8b_h100_2026-11-26.json).

    Construction compiles and captures everything (``cold_start_s``); the region is awake after.
    """

    def __init__(self, model, max_batch: int, max_len: int, *, dtype: Optional[torch.dtype] = None,
                 device: Union[None, str, torch.device] = None,
                 compile_options: Union[None, str, dict, bool] = "auto",
                 batch_buckets: Optional[Sequence[int]] = None, use_cuda_graphs: bool = True,
                 kv_region: bool = True, pad_token_id: Optional[int] = None, warmup: bool = True,
                 dynamic_batch: bool = True, fused_projections: bool = True, attention: str = "auto",
                 graph_sampling: Optional[bool] = None, sampling_modes: Sequence[str] = ("greedy", "sample"),
                 compile_scope: str = "layer", compile_backend: str = "inductor",
                 flag_resolver: FlagResolver = select, persistent_compile: Union[None, bool, str] = None,
                 pack_lora: bool = True, compile_prefill: bool = False, merge_lora: bool = False):
        t0 = time.perf_counter()
        param = next(model.parameters())
        self.model = model
        self.device = torch.device(device) if device is not None else param.device
        # Inductor's compile workers boot while the KV region and the decoder are built (a caller that
        # loads a model first does better: start_compile_workers before loading it, as compilepass grpo does)
        self.compile_workers = start_compile_workers(self.device, compile_options, compile_backend)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype or param.dtype
        self.max_batch, self.max_len = int(max_batch), int(max_len)
        if self.max_len < 2:
            raise ValueError("max_len must be >= 2")
        buckets = sorted({int(b) for b in (batch_buckets or default_buckets(self.max_batch))})
        if buckets[0] < 1 or buckets[-1] > self.max_batch:
            raise ValueError(f"batch buckets must lie in [1, max_batch={self.max_batch}], got {buckets}")
        if buckets[-1] != self.max_batch:
            buckets.append(self.max_batch)
        self.buckets = buckets
        config = getattr(model, "config", None)
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0

        causal_lm = causal_lm_of(model)
        self.shape = ModelShape.from_hf_config(causal_lm.config)
        s = self.shape
        # where construction's time goes (seconds, wall): kv_cache, decoder, options, step, warmup
        self.start_phases_s: dict[str, float] = {}
        t_phase = time.perf_counter()
        self.region, self.cache = build_kv_cache(s, self.max_batch, self.max_len, self.dtype, self.device, kv_region)
        t_phase = self._phase("kv_cache", t_phase)
        self._awake = True
        if attention == "auto":
            attention = default_attention(self.device, s.head_dim)
        if fused_projections and model_has_4bit(model):  # the 4-bit reference path runs per projection
            log.info("fused projections are off: this model's base linear layers are 4-bit")
            fused_projections = False
        self._lora_merge = LoraMerge(model) if merge_lora else None
        if self._lora_merge is not None and not self._lora_merge.modules:
            log.info("merge_lora: the model has no LoRA layers; nothing to merge")
            self._lora_merge = None
        self.decoder = Decoder(model, self.cache, fused_projections=fused_projections, attention=attention,
                               pack_lora=pack_lora and not self.merge_lora)
        self.fused_projections, self.attention = bool(fused_projections), attention
        t_phase = self._phase("decoder", t_phase)

        self.compile_options = resolve_options(model, compile_options, self.max_batch, self.dtype, flag_resolver)
        t_phase = self._phase("options", t_phase)
        self.use_cuda_graphs = bool(use_cuda_graphs) and self.device.type == "cuda"
        options = self.compile_options
        if options is not None and self.use_cuda_graphs:
            options = {**options, "triton.cudagraphs": False}
        self._inductor_cudagraphs = bool((options or {}).get("triton.cudagraphs", False))
        self._options = options
        self.dynamic_batch = bool(dynamic_batch) and options is not None and self.max_batch > 2
        if compile_scope not in ("step", "layer"):
            raise ValueError(f"compile_scope must be 'step' or 'layer', got {compile_scope!r}")
        self.compile_scope = compile_scope
        self.compile_backend = compile_backend
        persists = compile_scope == "layer" and options is not None and compile_backend == "inductor"
        self.persist_dir = resolve_persist_dir(persistent_compile) if persists else None  # eager: no dynamo import
        self._step = self._make_step()
        self.compile_prefill = bool(compile_prefill) and options is not None
        if self.compile_prefill:
            self.decoder.compile_prefill(options, backend=compile_backend)
        t_phase = self._phase("step", t_phase)
        self._graphs: dict[int, "torch.cuda.CUDAGraph"] = {}  # bucket -> logits-only step graph
        self._graph_adapter_state = None
        self._graph_out: dict[int, torch.Tensor] = {}
        self._no_logits_graph: set[int] = set()
        self._warm: set[int] = set()
        self._pool = None  # one CUDA-graph memory pool for every graph of the engine
        self.compile_s = 0.0
        self.capture_s = 0.0
        self.graph_error: Optional[str] = None  # why a capture failed, if one did
        if graph_sampling is None:  # default: in the graph wherever there are graphs
            graph_sampling = self.use_cuda_graphs
        self.graph_sampling = bool(graph_sampling)
        modes = [m for m in sampling_modes]
        for m in modes:
            if m not in ("greedy", "sample"):
                raise ValueError(f"sampling_modes holds 'greedy' / 'sample', got {m!r}")
        self.sampling_modes = modes
        self._sample_graphs: dict[tuple, "torch.cuda.CUDAGraph"] = {}  # (bucket, sampler key) -> graph
        self._sample_ready: set[tuple] = set()  # (bucket, key) warmed (and captured, on CUDA)
        self._post_fns: dict[tuple, Callable] = {}  # (key, compiled) -> sampler + bookkeeping
        # the decode loop's static buffers: every step (graph replay or eager) reads and writes these
        B, L, dev = self.max_batch, self.max_len, self.device
        self._tokens = torch.zeros(B, dtype=torch.long, device=dev)
        self._positions = torch.zeros(B, dtype=torch.long, device=dev)
        self._s_ids = torch.zeros((B, L), dtype=torch.long, device=dev)
        self._s_mask = torch.zeros((B, L), dtype=torch.long, device=dev)
        self._s_lp = torch.zeros((B, L), dtype=torch.float32, device=dev)
        self._s_slp = torch.zeros((B, L), dtype=torch.float32, device=dev)  # sampling log-probs (top-k / top-p)
        self._s_finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self._s_stops = torch.full((MAX_GRAPH_STOPS,), -1, dtype=torch.long, device=dev)
        self._s_step = torch.zeros(1, dtype=torch.long, device=dev)
        self._s_temp = torch.ones((), dtype=torch.float32, device=dev)
        self._s_pad = torch.full((), self.pad_token_id, dtype=torch.long, device=dev)
        self._gen = torch.Generator(device=dev)  # graph sampling's, registered with its graphs
        if warmup:
            t_phase = time.perf_counter()
            self.warmup()
            self._phase("warmup", t_phase)
        self.cold_start_s = time.perf_counter() - t0

    def _phase(self, name: str, since: float) -> float:
        """Record ``start_phases_s[name]`` (device work included) and return now."""
        _sync(self.device)
        now = time.perf_counter()
        self.start_phases_s[name] = now - since
        return now

    # -- state ---------------------------------------------------------------------------------

    @property
    def is_awake(self) -> bool:
        return self._awake

    def sleep(self) -> None:
        """Release the KV cache's physical memory (idempotent). Graphs stay valid; do not generate
        until :meth:`wake`."""
        if not self._awake:
            return
        _sync(self.device)
        if self.region is not None:
            self.region.sleep()
        self._awake = False

    def wake(self) -> None:
        """Map the KV cache's memory again at the same addresses (idempotent). Contents are not
        kept; the cache is zeroed (one memset) so that no NaN bit pattern sits under a masked
        position, where 0 * NaN would poison attention."""
        if self._awake:
            return
        if self.region is not None:
            self.region.wake(zero=True)
        self._awake = True

    def close(self) -> None:
        """Drop the graphs and free the region now; the engine is unusable afterwards."""
        _sync(self.device)
        self._graphs.clear()
        self._graph_out.clear()
        self._sample_graphs.clear()
        if self.region is not None:
            self.region.close()
        self._awake = False

    def _check_awake(self) -> None:
        if not self._awake:
            raise RuntimeError("the rollout engine is asleep (its KV memory is released): call wake() first")

    # -- compile and capture -------------------------------------------------------------------

    def _make_step(self):
        return make_decode_step(self.decoder, self._options, scope=self.compile_scope,
                                dynamic_batch=self.dynamic_batch, backend=self.compile_backend,
                                max_batch=self.max_batch, persist_dir=self.persist_dir)

    def _run_step(self, bucket: int) -> torch.Tensor:
        """The (compiled) step on the static buffers' first ``bucket`` rows, no graph replay."""
        tokens, positions = self._tokens[:bucket], self._positions[:bucket]
        if self.dynamic_batch and bucket >= 2 and self.compile_scope == "step":  # the layer scope marks its own
            for t in (tokens, positions):
                torch._dynamo.mark_dynamic(t, 0, min=2, max=self.max_batch)
        return self._step(tokens, positions)

    def _first_calls(self, buckets: Sequence[int], times: int) -> None:
        """Run (so compile, autotune, pick kernels) each bucket ``times`` times; if the dynamic-batch
        compile fails, switch to one static compile per bucket and start over."""
        try:
            for b in buckets:
                for _ in range(times):
                    self._run_step(b)
        except Exception as exc:
            if not self.dynamic_batch:
                raise
            log.warning("dynamic-batch compile of the decode step failed (%s: %s); compiling one static "
                        "graph per bucket instead", type(exc).__name__, (str(exc).splitlines() or [""])[0][:300])
            self.dynamic_batch = False
            self._step = self._make_step()
            for b in buckets:
                for _ in range(times):
                    self._run_step(b)

    def warmup(self, buckets: Optional[Sequence[int]] = None) -> None:
        """Compile the decode step for each bucket and, on CUDA, capture its graph (largest first,
        all in one memory pool, inside the gc capture patch). With ``graph_sampling`` the graphs
        captured are the step + sampler graphs of ``sampling_modes`` (the logits-only graph that
        :meth:`decode` replays is then captured on its first use)."""
        self._check_awake()
        wanted = sorted(buckets or self.buckets, reverse=True)
        todo = [b for b in wanted if b not in self._warm]
        with self.lora_merged():  # merge_lora: the graphs read the merged weights
            self.decoder.sync_adapters()
            if todo:
                self._compile_and_capture(todo)
            if self.graph_sampling:
                self._prepare_samplers([(b, (m,)) for b in wanted for m in self.sampling_modes])

    def _capture(self, items: Sequence, body: Callable, **kw) -> Captured:
        """:func:`capture_graphs` in the engine's memory pool, its times and error kept."""
        if items and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        got = capture_graphs(items, body, device=self.device, pool=self._pool, **kw)
        self._graph_adapter_state = self.decoder.adapter_state  # what the graphs read (see _sync_weights)
        self.compile_s += got.warmup_s
        self.capture_s += got.capture_s
        if got.error is not None:
            self.graph_error = got.error
        return got

    def _compile_and_capture(self, todo: list[int]) -> None:
        with eval_mode(self.model), torch.no_grad(), compile_limits():
            if not self.use_cuda_graphs:
                t0 = time.perf_counter()
                if self._inductor_cudagraphs:  # cudagraph trees record on the 2nd call, replay from the 3rd
                    for b in todo:
                        for _ in range(3):
                            torch.compiler.cudagraph_mark_step_begin()
                            self._run_step(b)
                else:
                    self._first_calls(todo, 1)
                self._warm.update(todo)
                _sync(self.device)
                self.compile_s += time.perf_counter() - t0
                return
            # compile, autotune, cuBLAS workspaces: all outside capture; graph sampling captures its
            # own step + sampler graphs instead of the logits-only ones
            self._capture_logits([] if self.graph_sampling else todo, warmup=lambda: self._first_calls(todo, 2))
            self._warm.update(todo)

    def _capture_logits(self, todo: list[int], warmup: Optional[Callable[[], None]] = None) -> None:
        """Capture the logits-only decode graph of each bucket in ``todo`` (compiled already, or by
        ``warmup``); after a failed capture that bucket and the rest run the step without a graph."""
        with eval_mode(self.model), torch.no_grad():
            got = self._capture(todo, self._run_step, warmup=warmup, describe=lambda b: f"bucket {b}",
                                stop_at_failure=True)
        for b, (graph, out) in got.graphs.items():
            self._graphs[b], self._graph_out[b] = graph, out
        self._no_logits_graph.update(got.failed)

    # -- the sampler after each step --------------------------------------------------------------

    def _post_fn(self, key: tuple, in_graph: bool) -> tuple[Callable, bool]:
        """(the sampler + bookkeeping for ``key`` (see :func:`sampler_key`), whether it is compiled):
        compiled (Inductor, torch's default options) for "greedy" and "sample" on the graph-sampling
        path when the step is compiled, eager otherwise (the host path samples eagerly)."""
        compiled = in_graph and self._options is not None and key[0] != "filtered"
        fn = self._post_fns.get((key, compiled))
        if fn is None:
            fn = post_function(key)
            if compiled and self.persist_dir is not None and self.compile_backend == "inductor" and key[0] != "filtered":
                fn = PersistentCompile(fn, key=dict(self.decoder.persist_key({}, self.dynamic_batch), fn=f"post:{key[0]}"),
                                       directory=self.persist_dir, compile_kwargs={"dynamic": None if self.dynamic_batch else False},
                                       dynamic_args=POST_BATCH_ARGS, dynamic_batch=self.dynamic_batch,
                                       max_batch=self.max_batch)
            elif compiled:
                fn = torch.compile(fn, backend=self.compile_backend, fullgraph=True,
                                   dynamic=None if self.dynamic_batch else False)
            self._post_fns[(key, compiled)] = fn
        return fn, compiled

    def _post(self, bucket: int, sampler: _Sampler, logits: torch.Tensor) -> None:
        """Sample from ``logits`` [bucket, V] and record the column (all on static buffers)."""
        noise = None
        if sampler.key[0] != "greedy":
            noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(
                generator=sampler.generator)
        b = bucket
        args = (logits, self._s_temp, noise, self._s_ids[:b], self._s_mask[:b], self._s_lp[:b], self._s_slp[:b],
                self._s_finished[:b], sampler.stops, self._s_step, self._tokens[:b], self._s_pad)
        fn, compiled = self._post_fn(sampler.key, sampler.in_graph)
        if compiled and self.dynamic_batch and b >= 2 and not isinstance(fn, PersistentCompile):
            for t in args:
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == b and t is not sampler.stops:
                    torch._dynamo.mark_dynamic(t, 0, min=2, max=self.max_batch)
        fn(*args)

    def _sample_body(self, bucket: int, sampler: _Sampler) -> None:
        """One whole decode step: model step on the static token / position buffers, positions + 1,
        sample, record. On the graph-sampling path this is what a sampler graph holds (the step
        runs as is); otherwise the step replays its logits-only graph where there is one."""
        logits = self._run_step(bucket) if sampler.in_graph else self._call_step(bucket)
        self._positions[:bucket].add_(1)  # the step above has read them (same stream)
        self._post(bucket, sampler, logits)

    def _graph_sampler(self, key: tuple) -> _Sampler:
        return _Sampler(key, True, self._gen, self._s_stops)

    def _prepare_samplers(self, keys: Sequence[tuple]) -> None:
        """Warm (compile) and, on CUDA, capture the step + sampler graph of each (bucket, key)."""
        todo = [rk for rk in dict.fromkeys(keys) if rk not in self._sample_ready]
        if not todo:
            return
        for b in sorted({b for b, _ in todo}, reverse=True):
            if b not in self._warm:
                self._compile_and_capture([b])
        for _, key in todo:
            self._post_fn(key, True)

        def reset(rk):  # warm-up runs execute for real: keep positions and the column index in range
            self._positions[:rk[0]].zero_()
            self._s_step.zero_()

        def body(rk):
            self._sample_body(rk[0], self._graph_sampler(rk[1]))

        def warm(times):
            for rk in todo:
                for _ in range(times):
                    reset(rk)
                    body(rk)

        with eval_mode(self.model), torch.no_grad(), compile_limits():
            if not self.use_cuda_graphs:
                t0 = time.perf_counter()
                if self._options is not None:  # compile the samplers now, not in the first generate
                    warm(1)
                self.compile_s += time.perf_counter() - t0
            else:
                got = self._capture(todo, body, warmup=lambda: warm(2), before=reset,
                                    generator=lambda rk: self._gen if rk[1][0] != "greedy" else None,
                                    describe=lambda rk: f"the sampler {rk[1]} for bucket {rk[0]}")
                self._sample_graphs.update({rk: graph for rk, (graph, _) in got.graphs.items()})
        self._sample_ready.update(todo)

    # -- decoding ------------------------------------------------------------------------------

    def bucket_for(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds max_batch {self.max_batch}")

    def _call_step(self, bucket: int) -> torch.Tensor:
        """Run the decode step on the static buffers' first ``bucket`` rows -> logits [bucket, V]."""
        graph = self._graphs.get(bucket)
        if graph is not None:
            graph.replay()
            return self._graph_out[bucket]
        if self._inductor_cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self._run_step(bucket)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step for ``len(tokens)`` sequences (cache rows ``[:B]``), padded to its bucket:
        tokens [B], positions [B] -> logits [B, vocab]. The result may be overwritten by the next
        call (it is the graph's static output): clone it to keep it. Call it with the model in
        eval mode (graphs are captured in eval mode; ``generate`` switches by itself)."""
        self._check_awake()
        if self.merge_lora and not self._lora_merge.active:
            raise RuntimeError("this engine runs with merge_lora=True: call decode() inside `with engine.lora_merged():` "
                               "(its graphs were captured with the adapters merged)")
        self._sync_weights()
        B = tokens.shape[0]
        bucket = self.bucket_for(B)
        if bucket not in self._warm:
            self._compile_and_capture([bucket])
        if (self.use_cuda_graphs and bucket not in self._graphs and bucket not in self._no_logits_graph):
            self._capture_logits([bucket])  # graph_sampling: the logits-only graph on first use
        self._tokens[:B].copy_(tokens)
        self._positions[:B].copy_(positions)
        if B < bucket:
            self._tokens[B:bucket].fill_(self.pad_token_id)
            self._positions[B:bucket].zero_()
        with torch.no_grad():
            return self._call_step(bucket)[:B]

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, eos_token_id: Union[None, int, Sequence[int]] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, seed: Optional[int] = None) -> RolloutOutput:
        """Complete each prompt (a list of token ids; lengths may differ) by up to ``max_new_tokens``.

        A sequence stops after the first token in ``eos_token_id`` or ``stop_token_ids`` (kept in
        the completion, mask 1) or at ``max_new_tokens``. ``temperature == 0`` is greedy. ``seed``
        seeds a ``torch.Generator`` on the device: the same seed (and the same prompts and
        max_batch) gives the same tokens; None draws from torch's global generator. More prompts
        than ``max_batch`` run in consecutive batches. See :class:`RolloutOutput`.
        """
        self._check_awake()
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        prompts, stops = check_generate_args(prompts, max_new_tokens, top_k, top_p, self.max_len,
                                             self.shape.vocab_size, eos_token_id, stop_token_ids)
        parts = []
        prefill_s = decode_s = 0.0
        steps = 0
        # merge_lora: this call's merge + restore counts in total_s (none when a caller's lora_merged() holds it)
        own_merge = self._lora_merge is not None and not self._lora_merge.active
        with self.lora_merged():
            self._sync_weights()
            sampler = self._sampler_for(prompts, temperature, top_k, top_p, stops, seed)
            with eval_mode(self.model), torch.no_grad():
                for start in range(0, len(prompts), self.max_batch):
                    chunk = prompts[start:start + self.max_batch]
                    part, p_s, d_s, n = self._generate_batch(chunk, max_new_tokens, sampler, bool(stops))
                    parts.append(part)
                    prefill_s, decode_s, steps = prefill_s + p_s, decode_s + d_s, steps + n

        N = max(int(p[3].max()) for p in parts)
        ids = torch.cat([p[0][:, :N] for p in parts])
        mask = torch.cat([p[1][:, :N] for p in parts])
        lps = torch.cat([p[2][:, :N] for p in parts])
        slps = lps if sampler.key[0] != "filtered" else torch.cat([p[4][:, :N] for p in parts])
        lengths = torch.cat([p[3] for p in parts])
        total = prefill_s + decode_s + (self._lora_merge.last_cycle_s if own_merge else 0.0)
        n_tokens = int(lengths.sum())
        return RolloutOutput(
            completion_ids=ids, completion_mask=mask, logprobs=lps,
            prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device),
            completion_lengths=lengths, prefill_s=prefill_s, decode_s=decode_s, total_s=total,
            decode_steps=steps, tokens_per_s=n_tokens / total if total > 0 else float("nan"),
            sampling_logprobs=slps,
        )

    @property
    def merge_lora(self) -> bool:
        """Whether generations run with the adapters merged (``merge_lora`` and a model with LoRA layers)."""
        return self._lora_merge is not None

    def lora_merged(self):
        """With ``merge_lora``: a context in which the adapters are merged into the base weights (what
        the engine's graphs read; ``generate`` enters it by itself), the exact base restored on exit.
        Without: a context that does nothing."""
        return self._lora_merge.merged() if self._lora_merge is not None else contextlib.nullcontext()

    def _sync_weights(self) -> None:
        """Before a generation: the fused weights still back the model, and the packed LoRA copies
        hold the adapters' current values. Adapters added, removed, replaced or disabled since the
        CUDA graphs were captured are refused: the graphs read the old ones."""
        self.decoder.check_weights()
        state = self.decoder.sync_adapters()
        if (self._graphs or self._sample_graphs) and state != self._graph_adapter_state:
            raise RuntimeError("the model's LoRA adapters were added, removed, replaced or disabled since this "
                               "engine captured its CUDA graphs, which read the old ones: build a new engine")

    def _sampler_for(self, prompts, temperature: float, top_k: int, top_p: float, stops: list[int],
                     seed: Optional[int]) -> _Sampler:
        """The call's sampler, its graphs prepared and its generator seeded: graph sampling for up
        to MAX_GRAPH_STOPS stop ids (the graphs' fixed-size buffer); else, or without graph
        sampling, the eager sampler with a ``torch.Generator`` seeded here (None: torch's global one)."""
        key = sampler_key(temperature, top_k, top_p, self.shape.vocab_size)
        in_graph = self.graph_sampling and len(stops) <= MAX_GRAPH_STOPS
        if in_graph:
            # compile / capture what this call needs first: warm-up runs draw from the generator
            sizes = {len(prompts[i:i + self.max_batch]) for i in range(0, len(prompts), self.max_batch)}
            self._prepare_samplers([(self.bucket_for(n), key) for n in sorted(sizes, reverse=True)])
            # the engine's own generator (registered with its graphs); no seed: one drawn from torch's
            # global generator, so torch.manual_seed still reproduces a run
            self._gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        self._s_temp.fill_(float(temperature) if temperature > 0 else 1.0)
        stop_t = torch.tensor(stops, dtype=torch.long, device=self.device)
        if not in_graph:
            generator = torch.Generator(device=self.device).manual_seed(int(seed)) if seed is not None else None
            return _Sampler(key, False, generator, stop_t)
        self._s_stops.fill_(-1)
        self._s_stops[:len(stops)].copy_(stop_t)
        return self._graph_sampler(key)

    def _prompt_tensors(self, prompts, bucket):
        lengths_list = [len(p) for p in prompts] + [1] * (bucket - len(prompts))
        T = max(lengths_list)
        ids = torch.full((bucket, T), self.pad_token_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device, non_blocking=True)
        lengths = torch.tensor(lengths_list, dtype=torch.long).to(self.device, non_blocking=True)
        return ids, lengths

    def _generate_batch(self, prompts, max_new_tokens: int, sampler: _Sampler, has_stops: bool):
        """Prefill, then one column per decode step on the static buffers: column 0 from the
        prefill's logits, each later one a replay of the (bucket, key) graph or the same step and
        sampler run eagerly; the host only checks for an early stop, every STOP_CHECK_EVERY steps.
        -> ((ids, mask, logprobs, lengths, sampling log-probs or None), prefill seconds, decode seconds,
        decode steps); the sampling log-probs only for a filtered (top-k / top-p) sampler."""
        dev = self.device
        B = len(prompts)
        bucket = self.bucket_for(B)
        if sampler.in_graph:
            self._prepare_samplers([(bucket, sampler.key)])
        elif bucket not in self._warm:
            self._compile_and_capture([bucket])
        ids, lengths = self._prompt_tensors(prompts, bucket)
        N = max_new_tokens

        _sync(dev)
        t0 = time.perf_counter()
        if self.compile_prefill:
            with compile_limits():  # one code object for every engine of the process
                logits = self.decoder.prefill(ids, lengths)
        else:
            logits = self.decoder.prefill(ids, lengths)
        _sync(dev)
        t1 = time.perf_counter()

        self._s_ids[:bucket, :N].fill_(self.pad_token_id)
        self._s_mask[:bucket, :N].zero_()
        self._s_lp[:bucket, :N].zero_()
        filtered = sampler.key[0] == "filtered"
        if filtered:
            self._s_slp[:bucket, :N].zero_()
        self._s_finished[:bucket].copy_(torch.arange(bucket, device=dev) >= B)  # padding rows never count
        self._s_step.zero_()
        self._positions[:bucket].copy_(lengths)
        self._post(bucket, sampler, logits)
        graph = self._sample_graphs.get((bucket, sampler.key)) if sampler.in_graph else None
        steps = 0
        for n in range(1, N):
            if has_stops and n % STOP_CHECK_EVERY == 0 and bool(self._s_finished[:bucket].all()):
                break
            if graph is not None:
                graph.replay()
            else:
                self._sample_body(bucket, sampler)
            steps += 1
        out_ids = self._s_ids[:B, :N].clone()
        out_mask = self._s_mask[:B, :N].clone()
        out_lp = self._s_lp[:B, :N].clone()
        out_slp = self._s_slp[:B, :N].clone() if filtered else None
        _sync(dev)
        t2 = time.perf_counter()
        return (out_ids, out_mask, out_lp, out_mask.sum(1), out_slp), t1 - t0, t2 - t1, steps

    def __repr__(self) -> str:
        return (f"RolloutEngine({self.shape.family}, max_batch={self.max_batch}, max_len={self.max_len}, "
                f"buckets={self.buckets}, graphs={sorted(self._graphs)}, "
                f"{'awake' if self._awake else 'asleep'})")

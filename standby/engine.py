"""The native rollout engine: batched sampling with the trainer's own model objects.

``RolloutEngine`` generates with the very modules the optimizer updates (a transformers Llama /
Qwen2 / Qwen3 causal LM, optionally peft-wrapped): no weight copy, no sync, no LoRA merge. Its KV
cache lives in a :class:`~compilepass.standby.memory.KVRegion`, so ``sleep()`` gives the cache's
physical memory to the trainer and ``wake()`` maps it back at the same addresses.

Decode runs ``Decoder.decode_step`` compiled by ``torch.compile`` (Inductor's own CUDA graphs
off) and, on CUDA, captured by us into one ``torch.cuda.CUDAGraph`` per batch-size bucket
(2, 4, 8, ..., max_batch) over static token / position buffers. A graph reads the weights and the
KV cache at fixed addresses, so it stays valid across sleep/wake cycles (the region's addresses
never move) and optimizer steps (parameters are updated in place). It does not survive a
parameter being *replaced* (``param.data = ...``, re-loading a state dict by assignment, moving
the model): build a new engine then.

Sampling (temperature, top-k, top-p, stop tokens) runs eagerly between graph replays with a
``torch.Generator`` on the device, so a seed reproduces the tokens exactly. Speed options, each
measured side by side (``benchmarks/bench_rollout.py --variants``; the defaults are the fastest
configuration that meets the cold-start target, see :class:`RolloutEngine`):
``fused_projections`` (one GEMM for q/k/v and one for gate/up over fused weights the model's own
parameters point into), ``attention`` ("matmul" | "sdpa" | "sdpa_gqa" | "triton" for decode),
``graph_sampling`` (sampler, log-prob and stop bookkeeping captured in the step's graph: one
replay per decode step, nothing else launched; seeded through the engine's own generator) and
``compile_scope="layer"`` (compile one layer, shared by all: a shorter cold start). Usage in a
GRPO loop::

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
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from compilepass.standby.decode import Decoder, StaticKVCache
from compilepass.standby.memory import KVRegion, required_bytes
from compilepass.standby.models import ModelShape

log = logging.getLogger(__name__)

__all__ = ["RolloutEngine", "RolloutOutput", "check_generate_args", "default_buckets", "sample_tokens", "sampler_key"]

#: How often (in decode steps) generate() syncs to see whether every sequence has stopped.
STOP_CHECK_EVERY = 8
#: torch.compile backend of the decode step ("inductor"; tests swap in dynamo's "eager" for speed).
_COMPILE_BACKEND = "inductor"
#: Stop ids a graph-captured sampler checks (a fixed-size buffer); more fall back to eager sampling.
MAX_GRAPH_STOPS = 32


@dataclass
class RolloutOutput:
    """What :meth:`RolloutEngine.generate` returns; tensors on the engine's device.

    ``completion_ids`` [B, N]: N is the longest completion of the call; positions after a
    sequence's stop hold ``pad_token_id``. ``completion_mask`` [B, N] (long): 1 up to and
    including the stop token (EOS / stop token), 0 after. ``logprobs`` [B, N] float32: at each
    sampled token, ``log_softmax(logits / temperature)`` of the model's raw logits (temperature
    1 when greedy), with top-k / top-p NOT applied — the policy's log-prob at the sampling
    temperature, which is what TRL's GRPO compares against; 0 where the mask is 0.
    ``prompt_lengths`` / ``completion_lengths`` [B] (long).

    Timing (seconds, wall clock, the device synchronized): ``prefill_s``, ``decode_s`` (every
    decode step and the sampling between them), ``total_s``; ``decode_steps`` (graph replays);
    ``tokens_per_s`` = sum(completion_lengths) / total_s.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_lengths: torch.Tensor
    completion_lengths: torch.Tensor
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    decode_steps: int = 0
    tokens_per_s: float = 0.0
    extra: dict = field(default_factory=dict)


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


def check_generate_args(prompts, max_new_tokens: int, top_k: int, top_p: float, max_len: int, vocab_size: int,
                        eos_token_id=None, stop_token_ids=None) -> tuple[list[list[int]], list[int]]:
    """The checks every engine's ``generate`` makes (ValueError with the reason): returns the
    prompts as lists of ints and the sorted, de-duplicated stop ids (EOS and stop tokens)."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("no prompts")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if top_k < 0:
        raise ValueError("top_k must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new_tokens - 1 > max_len:
            raise ValueError(f"prompt {i} ({len(p)} tokens) + max_new_tokens {max_new_tokens} exceeds the "
                             f"engine's max_len {max_len}")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} holds a token id outside [0, {vocab_size})")
    stops: list[int] = []
    for ids in (eos_token_id, stop_token_ids):
        if ids is None:
            continue
        stops.extend([int(ids)] if isinstance(ids, int) else [int(t) for t in ids])
    return prompts, sorted(set(stops))


# ------------------------------------------------------------------------------------ sampling


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B] long, logprobs [B] float32) from ``logits`` [B, V].

    ``temperature == 0``: argmax, log-probs of ``log_softmax(logits)``. Otherwise the logits are
    divided by ``temperature``, restricted to the ``top_k`` largest (0: all) and then to the
    smallest set whose probability reaches ``top_p`` (the most likely token always stays), and a
    token is drawn with the exponential-race trick (``argmax(p / Exp(1))``: no host sync,
    reproducible with ``generator``). The log-prob is ``log_softmax(logits / temperature)`` at
    the drawn token, top-k / top-p not applied.
    """
    if temperature == 0:
        return _greedy_pick(logits)
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if top_p < 1.0 and not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    # a 0-dim device tensor, as in the graph-captured sampler (one code path, bitwise the same numbers)
    temp = torch.full((), float(temperature), dtype=torch.float32, device=logits.device)
    noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(generator=generator)
    return _race_pick(logits, temp, noise, top_k, top_p)


def _greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float()
    tokens = x.argmax(-1)
    return tokens, x.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(x, -1)


def _race_pick(logits: torch.Tensor, temperature: torch.Tensor, noise: torch.Tensor, top_k: int = 0,
               top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponential race over ``softmax(filter(logits / temperature))`` with ``noise`` ~ Exp(1)
    [B, V] float32 (drawn by the caller); ``temperature`` a 0-dim float32 tensor."""
    x = logits.float() / temperature
    logprobs_all = x.log_softmax(-1)
    filtered = x
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = filtered.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        filtered = torch.empty_like(filtered).scatter_(-1, order, sorted_logits)
    probs = filtered.softmax(-1)
    tokens = (probs / noise).argmax(-1)
    return tokens, logprobs_all.gather(-1, tokens[:, None])[:, 0]


def _record(tokens, logprobs, ids, mask, lps, finished, stops, step, tokens_buf, pad) -> None:
    """One generated column, in place on the loop's static buffers (all [B] / [B, L] views): write
    column ``step`` (a [1] long tensor) of ids / mask / logprobs for the sequences still alive,
    mark those that hit a stop id (``stops``: fixed size, padded with -1), set the next input
    tokens (pad for finished sequences) and advance ``step``. No host sync, no data-dependent
    shapes: the graph-captured sampler runs it inside the decode step's CUDA graph."""
    alive = ~finished
    ids.index_copy_(1, step, torch.where(alive, tokens, pad)[:, None])
    mask.index_copy_(1, step, alive.long()[:, None])
    lps.index_copy_(1, step, torch.where(alive, logprobs, 0.0)[:, None])
    finished.logical_or_(alive & (tokens[:, None] == stops[None, :]).any(-1))
    tokens_buf.copy_(torch.where(finished, pad, tokens))
    step.add_(1)


def _post_greedy(logits, temperature, noise, ids, mask, lps, finished, stops, step, tokens_buf, pad):
    tokens, lp = _greedy_pick(logits)
    _record(tokens, lp, ids, mask, lps, finished, stops, step, tokens_buf, pad)


def _post_sample(logits, temperature, noise, ids, mask, lps, finished, stops, step, tokens_buf, pad):
    tokens, lp = _race_pick(logits, temperature, noise)
    _record(tokens, lp, ids, mask, lps, finished, stops, step, tokens_buf, pad)


def _post_filtered(top_k: int, top_p: float):
    def post(logits, temperature, noise, ids, mask, lps, finished, stops, step, tokens_buf, pad):
        tokens, lp = _race_pick(logits, temperature, noise, top_k, top_p)
        _record(tokens, lp, ids, mask, lps, finished, stops, step, tokens_buf, pad)
    return post


def sampler_key(temperature: float, top_k: int, top_p: float, vocab: int) -> tuple:
    """Which captured sampler a request uses: ("greedy",), ("sample",) (temperature only; any
    temperature shares it) or ("filtered", top_k, top_p)."""
    if temperature == 0:
        return ("greedy",)
    k = top_k if 0 < top_k < vocab else 0
    p = float(top_p) if top_p < 1.0 else 1.0
    if k == 0 and p == 1.0:
        return ("sample",)
    return ("filtered", k, p)


# -------------------------------------------------------------------------------------- helpers


def _separate_storage(t: torch.Tensor) -> torch.Tensor:
    """The same memory as ``t`` (zero-copy) as a tensor with a storage of its own.

    ``KVRegion.carve`` views all share the region's one storage; torch.compile treats inputs that
    share a storage as aliased and mutates them through a slow synthetic-base path. The wrapper
    keeps ``t`` (hence the region's mapping) alive.
    """
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cuda":
        from compilepass.standby.memory import _CudaArray

        with torch.cuda.device(t.device):
            raw = torch.as_tensor(_CudaArray(t.data_ptr(), nbytes, t), device=t.device)
    else:
        import numpy as np

        class _HostArray:
            def __init__(self, ptr, n, owner):
                self._owner = owner
                self.__array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (ptr, False),
                                            "strides": None, "version": 3}

        raw = torch.from_numpy(np.asarray(_HostArray(t.data_ptr(), nbytes, t)))
    out = raw.view(t.dtype).view(t.shape)
    if out.data_ptr() != t.data_ptr():  # pragma: no cover - a torch contract
        raise RuntimeError("re-wrapping a KV tensor copied it")
    return out


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode for the block (no dropout while generating), each module's flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    if not any(mode for _, mode in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resolve_options(model, compile_options, batch: int, dtype):
    """None -> torch's defaults ({}); "auto" -> the tuning database's flags for this model
    (``compilepass.select``, workload "rollout") when available, else defaults; False -> no
    compile (eager); a dict as is."""
    if compile_options is False:
        return None
    if compile_options is None:
        return {}
    if compile_options == "auto":
        try:
            from compilepass.select import select
        except ImportError:
            log.info("compile_options='auto': no tuning selection available, using torch's defaults")
            return {}
        try:
            chosen = select(model, "rollout", batch=batch, dtype=dtype)
        except Exception as exc:  # a selection failure must not stop generation
            log.warning("compile_options='auto': selection failed (%s), using torch's defaults", exc)
            return {}
        return dict(getattr(chosen, "flags", chosen) or {})
    if isinstance(compile_options, dict):
        return dict(compile_options)
    raise TypeError(f"compile_options must be None, 'auto', False or a dict, got {compile_options!r}")


def kv_cache_specs(shape: ModelShape, batch: int, max_len: int, dtype: torch.dtype) -> list[tuple]:
    """The KV region's layout (``KVRegion.carve`` / ``required_bytes`` specs): per layer, K then V,
    each [batch, kv_heads, max_len, head_dim]."""
    dims = (batch, shape.num_kv_heads, max_len, shape.head_dim)
    return [(f"{kind}{i}", dtype, dims) for i in range(shape.num_layers) for kind in "kv"]


def default_attention(device: torch.device, head_dim: int) -> str:
    """``attention="auto"``: the split-sequence Triton kernel on CUDA (power-of-two head sizes),
    else the two-matmul path (CPU: the kernel would run in the Triton interpreter)."""
    if device.type != "cuda":
        return "matmul"
    from compilepass.kernels._triton_support import triton_available
    from compilepass.kernels.decode_attention import supported

    return "triton" if triton_available() and supported(head_dim) else "matmul"


# --------------------------------------------------------------------------------------- engine


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
      compile), a dict = these options.
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
      :func:`~compilepass.standby.decode.fuse_projections`). Default on: on an H100 it took the
      qwen3-0.6b decode step (batch 32) from 2.556 to 2.114 ms (benchmarks/results/
      rollout_variants_qwen3-0.6b_qwen3-8b_h100_2026-11-26.json).
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
                 compile_scope: str = "layer"):
        t0 = time.perf_counter()
        param = next(model.parameters())
        self.model = model
        self.device = torch.device(device) if device is not None else param.device
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

        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.shape = ModelShape.from_hf_config(causal_lm.config)
        s = self.shape
        if kv_region:
            specs = kv_cache_specs(s, self.max_batch, self.max_len, self.dtype)
            self.region: Optional[KVRegion] = KVRegion(required_bytes(specs), device=self.device)
            views = self.region.carve(specs)
            k = [_separate_storage(views[f"k{i}"]) for i in range(s.num_layers)]
            v = [_separate_storage(views[f"v{i}"]) for i in range(s.num_layers)]
            self.region.as_bytes().zero_()  # no NaN bit patterns under masked positions
            self.cache = StaticKVCache.from_tensors(s, k, v)
        else:
            self.region = None
            self.cache = StaticKVCache(s, self.max_batch, self.max_len, self.dtype, self.device)
        self._awake = True
        if attention == "auto":
            attention = default_attention(self.device, s.head_dim)
        self.decoder = Decoder(model, self.cache, fused_projections=fused_projections, attention=attention)
        self.fused_projections, self.attention = bool(fused_projections), attention

        self.compile_options = _resolve_options(model, compile_options, self.max_batch, self.dtype)
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
        self._step = self._make_step()
        self._tokens = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        self._graphs: dict[int, "torch.cuda.CUDAGraph"] = {}
        self._graph_out: dict[int, torch.Tensor] = {}
        self._no_logits_graph: set[int] = set()
        self._warm: set[int] = set()
        self._pool = None
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
        self._post_fns: dict[tuple, Callable] = {}
        if self.graph_sampling:
            L = self.max_len
            dev = self.device
            self._gen = torch.Generator(device=dev)
            self._s_ids = torch.zeros((self.max_batch, L), dtype=torch.long, device=dev)
            self._s_mask = torch.zeros((self.max_batch, L), dtype=torch.long, device=dev)
            self._s_lp = torch.zeros((self.max_batch, L), dtype=torch.float32, device=dev)
            self._s_finished = torch.zeros(self.max_batch, dtype=torch.bool, device=dev)
            self._s_stops = torch.full((MAX_GRAPH_STOPS,), -1, dtype=torch.long, device=dev)
            self._s_step = torch.zeros(1, dtype=torch.long, device=dev)
            self._s_temp = torch.ones((), dtype=torch.float32, device=dev)
            self._s_pad = torch.full((), self.pad_token_id, dtype=torch.long, device=dev)
        if warmup:
            self.warmup()
        self.cold_start_s = time.perf_counter() - t0

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
        options = self._options
        if options is None:
            return self.decoder.decode_step
        from compilepass.workloads import inductor_options_for_torch

        options = inductor_options_for_torch(options)
        if self.compile_scope == "layer":
            self.decoder.compile_layers(options, dynamic_batch=self.dynamic_batch, backend=_COMPILE_BACKEND,
                                        max_batch=self.max_batch)
            return self.decoder.decode_step
        if _COMPILE_BACKEND != "inductor":  # tests: the engine's plumbing without Inductor's compile time
            return torch.compile(self.decoder.decode_step, backend=_COMPILE_BACKEND, fullgraph=True,
                                 dynamic=None if self.dynamic_batch else False)
        if not self.dynamic_batch:
            return self.decoder.compiled_decode_step(options)
        return torch.compile(self.decoder.decode_step, options=options or None, fullgraph=True, dynamic=None)

    def _run_step(self, bucket: int) -> torch.Tensor:
        """The (compiled) step on the static buffers' first ``bucket`` rows, no graph replay."""
        tokens, positions = self._tokens[:bucket], self._positions[:bucket]
        if self.dynamic_batch and bucket >= 2:
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

    @contextlib.contextmanager
    def _compile_limits(self):
        """One compiled graph per bucket (dynamic=False), possibly several engines per process:
        raise dynamo's recompile limit for the warm-up so no bucket falls back to eager."""
        import torch._dynamo.config as dc

        name = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"
        with dc.patch(**{name: max(getattr(dc, name), 4096)}):
            yield

    def warmup(self, buckets: Optional[Sequence[int]] = None) -> None:
        """Compile the decode step for each bucket and, on CUDA, capture its graph (largest first,
        all in one memory pool, inside the gc capture patch). With ``graph_sampling`` the graphs
        captured are the step + sampler graphs of ``sampling_modes`` (the logits-only graph that
        :meth:`decode` replays is then captured on its first use)."""
        self._check_awake()
        wanted = sorted(buckets or self.buckets, reverse=True)
        todo = [b for b in wanted if b not in self._warm]
        if todo:
            self._compile_and_capture(todo)
        if self.graph_sampling:
            self._prepare_samplers([(b, (m,)) for b in wanted for m in self.sampling_modes])

    def _compile_and_capture(self, todo: list[int]) -> None:
        with _eval_mode(self.model), torch.no_grad(), self._compile_limits():
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
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                self._first_calls(todo, 2)  # compile, autotune, cuBLAS workspaces: all outside capture
            torch.cuda.current_stream(self.device).wait_stream(stream)
            _sync(self.device)
            self.compile_s += time.perf_counter() - t0
            self._warm.update(todo)
            if not self.graph_sampling:
                self._capture_logits(todo)

    def _capture_logits(self, todo: list[int]) -> None:
        """Capture the logits-only decode graph of each bucket in ``todo`` (compiled already)."""
        from compilepass.gc_patch import suppress_gc_during_capture

        t1 = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with _eval_mode(self.model), torch.no_grad(), suppress_gc_during_capture():
            for i, b in enumerate(todo):
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=self._pool):
                        out = self._run_step(b)
                except Exception as exc:  # keep generating, without graphs for the rest
                    self.graph_error = f"{type(exc).__name__}: {exc}"[:2000]
                    log.warning("CUDA-graph capture of bucket %d failed (%s); buckets %s run the compiled "
                                "step without a graph", b, self.graph_error.splitlines()[0][:300], todo[i:])
                    self._no_logits_graph.update(todo[i:])
                    break
                self._graphs[b], self._graph_out[b] = graph, out
        _sync(self.device)
        self.capture_s += time.perf_counter() - t1

    # -- the graph-captured sampler (graph_sampling=True) ---------------------------------------

    def _post_fn(self, key: tuple) -> Callable:
        """The sampler + bookkeeping for ``key`` (see :func:`sampler_key`): compiled (Inductor, torch's
        default options) for "greedy" and "sample" when the step is compiled, eager otherwise."""
        fn = self._post_fns.get(key)
        if fn is None:
            if key[0] == "filtered":
                fn = _post_filtered(key[1], key[2])
            else:
                fn = _post_greedy if key[0] == "greedy" else _post_sample
                if self._options is not None:
                    fn = torch.compile(fn, backend=_COMPILE_BACKEND, fullgraph=True,
                                       dynamic=None if self.dynamic_batch else False)
            self._post_fns[key] = fn
        return fn

    def _post(self, bucket: int, key: tuple, logits: torch.Tensor) -> None:
        """Sample from ``logits`` [bucket, V] and record the column (all on static buffers)."""
        noise = None
        if key[0] != "greedy":
            noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(
                generator=self._gen)
        b = bucket
        args = (logits, self._s_temp, noise, self._s_ids[:b], self._s_mask[:b], self._s_lp[:b],
                self._s_finished[:b], self._s_stops, self._s_step, self._tokens[:b], self._s_pad)
        fn = self._post_fn(key)
        if self.dynamic_batch and b >= 2 and key[0] != "filtered" and self._options is not None:
            for t in args:
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == b and t is not self._s_stops:
                    torch._dynamo.mark_dynamic(t, 0, min=2, max=self.max_batch)
        fn(*args)

    def _sample_body(self, bucket: int, key: tuple) -> None:
        """One whole decode step: model step on the static token / position buffers, positions + 1,
        sample, record. What a sampler graph holds."""
        logits = self._run_step(bucket)
        self._positions[:bucket].add_(1)  # the step above has read them (same stream)
        self._post(bucket, key, logits)

    def _prepare_samplers(self, keys: Sequence[tuple]) -> None:
        """Warm (compile) and, on CUDA, capture the step + sampler graph of each (bucket, key)."""
        todo = [rk for rk in dict.fromkeys(keys) if rk not in self._sample_ready]
        if not todo:
            return
        for b in sorted({b for b, _ in todo}, reverse=True):
            if b not in self._warm:
                self._compile_and_capture([b])
        for _, key in todo:
            self._post_fn(key)

        def reset(b):  # warm-up runs execute for real: keep positions and the column index in range
            self._positions[:b].zero_()
            self._s_step.zero_()

        if not self.use_cuda_graphs:
            t0 = time.perf_counter()
            if self._options is not None:  # compile the samplers now, not in the first generate
                with _eval_mode(self.model), torch.no_grad(), self._compile_limits():
                    for b, key in todo:
                        reset(b)
                        self._sample_body(b, key)
            self._sample_ready.update(todo)
            self.compile_s += time.perf_counter() - t0
            return
        from compilepass.gc_patch import suppress_gc_during_capture

        with _eval_mode(self.model), torch.no_grad(), self._compile_limits():
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                for b, key in todo:
                    for _ in range(2):
                        reset(b)
                        self._sample_body(b, key)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            _sync(self.device)
            t1 = time.perf_counter()
            self.compile_s += t1 - t0
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with suppress_gc_during_capture():
                for b, key in todo:
                    reset(b)
                    graph = torch.cuda.CUDAGraph()
                    try:
                        if key[0] != "greedy":
                            graph.register_generator_state(self._gen)  # graph-safe RNG on our generator
                        with torch.cuda.graph(graph, pool=self._pool):
                            self._sample_body(b, key)
                    except Exception as exc:  # keep generating: this sampler runs eagerly per step
                        self.graph_error = f"{type(exc).__name__}: {exc}"[:2000]
                        log.warning("CUDA-graph capture of the sampler %s for bucket %d failed (%s); it runs "
                                    "without a graph", key, b, self.graph_error.splitlines()[0][:300])
                        _sync(self.device)
                    else:
                        self._sample_graphs[(b, key)] = graph
                    self._sample_ready.add((b, key))
            _sync(self.device)
            self.capture_s += time.perf_counter() - t1

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

    @property
    def decode_step_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(tokens [B], positions [B]) -> logits [B, vocab]``, for the tuner's rollout workload."""
        return self.decode

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
        prompts, stops = check_generate_args(prompts, max_new_tokens, top_k, top_p, self.max_len,
                                             self.shape.vocab_size, eos_token_id, stop_token_ids)
        stop_t = torch.tensor(stops, dtype=torch.long, device=self.device) if stops else None
        self.decoder.check_weights()
        graphed = self.graph_sampling and len(stops) <= MAX_GRAPH_STOPS
        generator = key = None
        if graphed:
            key = sampler_key(temperature, top_k, top_p, self.shape.vocab_size)
            # compile / capture what this call needs first: warm-up runs draw from the generator
            sizes = {len(prompts[i:i + self.max_batch]) for i in range(0, len(prompts), self.max_batch)}
            self._prepare_samplers([(self.bucket_for(n), key) for n in sorted(sizes, reverse=True)])
            # the engine's own generator (registered with its graphs); no seed: one drawn from torch's
            # global generator, so torch.manual_seed still reproduces a run
            self._gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
            self._s_temp.fill_(float(temperature) if temperature > 0 else 1.0)
            self._s_stops.fill_(-1)
            if stop_t is not None:
                self._s_stops[:len(stops)].copy_(stop_t)
        elif seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))

        parts = []
        prefill_s = decode_s = 0.0
        steps = 0
        with _eval_mode(self.model), torch.no_grad():
            for start in range(0, len(prompts), self.max_batch):
                chunk = prompts[start:start + self.max_batch]
                if graphed:
                    part, p_s, d_s, n = self._generate_batch_graphed(chunk, max_new_tokens, key, stop_t is not None)
                else:
                    part, p_s, d_s, n = self._generate_batch(chunk, max_new_tokens, temperature, top_k, top_p,
                                                             stop_t, generator)
                parts.append(part)
                prefill_s, decode_s, steps = prefill_s + p_s, decode_s + d_s, steps + n

        N = max(int(p[3].max()) for p in parts)
        ids = torch.cat([p[0][:, :N] for p in parts])
        mask = torch.cat([p[1][:, :N] for p in parts])
        lps = torch.cat([p[2][:, :N] for p in parts])
        lengths = torch.cat([p[3] for p in parts])
        total = prefill_s + decode_s
        n_tokens = int(lengths.sum())
        return RolloutOutput(
            completion_ids=ids, completion_mask=mask, logprobs=lps,
            prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device),
            completion_lengths=lengths, prefill_s=prefill_s, decode_s=decode_s, total_s=total,
            decode_steps=steps, tokens_per_s=n_tokens / total if total > 0 else float("nan"),
        )

    def _prompt_tensors(self, prompts, bucket):
        lengths_list = [len(p) for p in prompts] + [1] * (bucket - len(prompts))
        T = max(lengths_list)
        ids = torch.full((bucket, T), self.pad_token_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device, non_blocking=True)
        lengths = torch.tensor(lengths_list, dtype=torch.long).to(self.device, non_blocking=True)
        return ids, lengths

    def _generate_batch_graphed(self, prompts, max_new_tokens, key, has_stops):
        """As ``_generate_batch``, but each decode step is one replay of the (bucket, key) graph
        (step + sampler + bookkeeping on static buffers); the host only checks for an early stop."""
        dev = self.device
        B = len(prompts)
        bucket = self.bucket_for(B)
        self._prepare_samplers([(bucket, key)])
        ids, lengths = self._prompt_tensors(prompts, bucket)
        N = max_new_tokens

        _sync(dev)
        t0 = time.perf_counter()
        logits = self.decoder.prefill(ids, lengths)
        _sync(dev)
        t1 = time.perf_counter()

        self._s_ids[:bucket, :N].fill_(self.pad_token_id)
        self._s_mask[:bucket, :N].zero_()
        self._s_lp[:bucket, :N].zero_()
        self._s_finished[:bucket].copy_(torch.arange(bucket, device=dev) >= B)  # padding rows never count
        self._s_step.zero_()
        self._positions[:bucket].copy_(lengths)
        self._post(bucket, key, logits)  # column 0, from the prefill's logits
        graph = self._sample_graphs.get((bucket, key))
        steps = 0
        for n in range(1, N):
            if has_stops and n % STOP_CHECK_EVERY == 0 and bool(self._s_finished[:bucket].all()):
                break
            if graph is not None:
                graph.replay()
            else:
                self._sample_body(bucket, key)
            steps += 1
        out_ids = self._s_ids[:B, :N].clone()
        out_mask = self._s_mask[:B, :N].clone()
        out_lp = self._s_lp[:B, :N].clone()
        _sync(dev)
        t2 = time.perf_counter()
        return (out_ids, out_mask, out_lp, out_mask.sum(1)), t1 - t0, t2 - t1, steps

    def _generate_batch(self, prompts, max_new_tokens, temperature, top_k, top_p, stop_t, generator):
        dev = self.device
        B = len(prompts)
        bucket = self.bucket_for(B)
        if bucket not in self._warm:
            self._compile_and_capture([bucket])
        ids, lengths = self._prompt_tensors(prompts, bucket)

        _sync(dev)
        t0 = time.perf_counter()
        logits = self.decoder.prefill(ids, lengths)
        _sync(dev)
        t1 = time.perf_counter()

        out_ids = torch.full((bucket, max_new_tokens), self.pad_token_id, dtype=torch.long, device=dev)
        out_mask = torch.zeros((bucket, max_new_tokens), dtype=torch.long, device=dev)
        out_lp = torch.zeros((bucket, max_new_tokens), dtype=torch.float32, device=dev)
        finished = torch.arange(bucket, device=dev) >= B  # padding rows never count
        pad = torch.tensor(self.pad_token_id, dtype=torch.long, device=dev)
        positions = self._positions[:bucket]
        positions.copy_(lengths)
        tokens_buf = self._tokens[:bucket]
        steps = 0
        for n in range(max_new_tokens):
            token, lp = sample_tokens(logits, temperature, top_k, top_p, generator)
            alive = ~finished
            out_ids[:, n] = torch.where(alive, token, pad)
            out_mask[:, n] = alive.long()
            out_lp[:, n] = torch.where(alive, lp, 0.0)
            if stop_t is not None:
                finished = finished | (alive & torch.isin(token, stop_t))
                if (n + 1) % STOP_CHECK_EVERY == 0 and bool(finished.all()):
                    break
            if n + 1 == max_new_tokens:
                break
            tokens_buf.copy_(torch.where(finished, pad, token))
            logits = self._call_step(bucket)
            positions.add_(1)  # the step above has read them (same stream)
            steps += 1
        _sync(dev)
        t2 = time.perf_counter()
        lengths_out = out_mask[:B].sum(1)
        return (out_ids[:B], out_mask[:B], out_lp[:B], lengths_out), t1 - t0, t2 - t1, steps

    def __repr__(self) -> str:
        return (f"RolloutEngine({self.shape.family}, max_batch={self.max_batch}, max_len={self.max_len}, "
                f"buckets={self.buckets}, graphs={sorted(self._graphs)}, "
                f"{'awake' if self._awake else 'asleep'})")


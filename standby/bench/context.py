"""``compilepass bench context``: the longest completion one GRPO step fits on this device.

:func:`max_context` searches the completion length L per generation (doubling from ``min_len``,
then bisection between the last length that fit and the first that did not, down to
``resolution`` tokens) for which one full GRPO step completes: generate ``generations``
completions of exactly L tokens (no EOS stop) for one prompt, then one training step (policy
log-probs through the model body + chunked log-softmax, GRPO loss, backward, AdamW step on the
LoRA adapter; gradient checkpointing on). A step "fits" when it raises no out-of-memory error.

``standby=True``: the engine's KV region sleeps during training (its memory goes to the
trainer); ``standby=False``: the KV region stays mapped during training (what a trainer without
standby memory pays).

``generate_tokens=K`` (default None: all L): decode only the first K tokens for real — with the
KV region already sized and mapped for all L, so generation's memory peak is the same — and fill
the rest of each completion with random token ids before the training step on all L tokens
(training memory does not depend on the token values). A decode step of a 32B model costs about
20 ms on an H100, so a full search with real L-token generations takes hours; each trial records
``generated_tokens``. ``offload_activations=True``: reentrant checkpointing with the checkpointed
activations offloaded to pinned CPU memory (:mod:`compilepass.standby.training.offload`).
``mlp_chunk_tokens`` (default 4096; 0 = off): the MLPs run over that many tokens at a time while
training, and LoRA layers compute in the model's dtype (:mod:`compilepass.standby.training.train_memory`).

Peak memory per trial (GiB): on CUDA the torch allocator's peak of each phase plus the KV
region's bytes while it is mapped (the region is mapped with the CUDA driver, outside the
allocator, so ``torch.cuda.max_memory_allocated`` does not see it): ``max(gen peak + region,
train peak + (region if standby off else 0))``. On CPU: the process's peak resident set size.

``engine="vllm"``: each trial generates with
:class:`~compilepass.standby.rollout.vllm.engine.VllmEngine` (built for that trial's length, on the
trainer's weights; standby releases only its KV cache), and peak memory is the device's used memory
sampled from the driver (:class:`~compilepass.standby.bench.device_peak.DevicePeak`: torch still
counts vLLM's released KV cache as allocated), on the capped card under a cap.

``load_in_4bit=True``: the base is NF4 with double quantization (QLoRA,
:func:`~compilepass.core.quantize.quantize_linears` for a preset, transformers' ``BitsAndBytesConfig``
for a directory), frozen, with peft's 4-bit LoRA on it; the native engine generates from the same
packed weights.

``micro_batch_size=M``: M completions per training forward/backward, gradients accumulated over
the group before the one optimizer step (None: the whole group in one forward).

CPU runs are refused (they measure nothing useful about a GPU) unless ``allow_cpu=True`` (smoke
tests with tiny lengths).

Every count and size argument is checked before any work (the same checks for the command's
flags and for these functions' arguments): an integer, >= 1 (``generations`` >= 2,
``mlp_chunk_tokens`` >= 0, where 0 turns tiling off), ``max_len`` >= ``min_len``; anything else
is one :class:`~compilepass.core.errors.CompilepassError` line naming the flag.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from compilepass.core.errors import CompilepassError
from compilepass.core.models import add_lora, build_model
from compilepass.core.shapes import resolve_model_source
from compilepass.kernels import grpo_loss
from compilepass.standby.bench.device_peak import DevicePeak
from compilepass.standby.grpo.metrics import peak_memory_gib
from compilepass.standby.memory.cap import DeviceMemoryCap
from compilepass.standby.rollout.engine import RolloutEngine
from compilepass.standby.training.checkpointing import enable_checkpointing
from compilepass.standby.training.logprobs import policy_logprobs
from compilepass.standby.training.loss import group_advantages
from compilepass.standby.training.offload import ActivationOffload
from compilepass.standby.training.train_memory import lora_mixed_precision, tile_mlp

log = logging.getLogger(__name__)

__all__ = ["ContextTrial", "ContextBenchResult", "max_context", "run_trial"]


@dataclass
class ContextTrial:
    completion_len: int
    ok: bool
    peak_mem_gib: Optional[float] = None
    gen_peak_gib: Optional[float] = None
    train_peak_gib: Optional[float] = None
    kv_region_gib: float = 0.0
    step_s: Optional[float] = None
    generate_s: Optional[float] = None
    train_s: Optional[float] = None
    generated_tokens: Optional[int] = None
    error: Optional[str] = None


@dataclass
class ContextBenchResult:
    model: str
    device: str
    standby: bool
    generations: int
    lora_rank: int
    prompt_len: int
    generate_tokens: Optional[int]  # None: every trial generated all L tokens
    offload_activations: bool
    mlp_chunk_tokens: int  # 0: MLP tiling off
    max_completion_len: int  # the largest length that fit; 0 when even min_len did not
    peak_mem_gib: Optional[float]  # of the trial at max_completion_len
    device_total_gib: Optional[float]  # the card as the run saw it (the capped size under a cap)
    trials: list[ContextTrial] = field(default_factory=list)
    wall_s: float = 0.0
    device_memory_cap: Optional[dict] = None  # DeviceMemoryCap.describe() when the run was capped
    engine: str = "native"  # the rollout engine of every trial: native or vllm
    micro_batch_size: Optional[int] = None  # completions per training forward (None: the whole group)
    load_in_4bit: bool = False  # a QLoRA base (NF4, double quantization)

    def to_dict(self) -> dict:
        return asdict(self)


def _gib(n: float) -> float:
    return n / 2**30


DTYPES = ("bfloat16", "float16", "float32")
ENGINES = ("native", "vllm")


def _build_engine(kind: str, model, generations: int, max_len: int, compile_options):
    if kind == "vllm":
        from compilepass.standby.rollout.vllm.engine import VllmEngine  # vLLM imports only when asked for

        return VllmEngine(model, max_batch=generations, max_len=max_len, compile_options=compile_options,
                          pad_token_id=0)
    return RolloutEngine(model, max_batch=generations, max_len=max_len, compile_options=compile_options,
                         pad_token_id=0)


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise CompilepassError(f"--engine must be one of {', '.join(ENGINES)} (got {engine!r})")


def _check_int(flag: str, value, minimum: int, optional: bool = False, why: str = "") -> None:
    """``value`` an integer >= ``minimum`` (or None when ``optional``), else one error line naming ``flag``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise CompilepassError(f"{flag} must be an integer (got {value!r})")
    if value < minimum:
        raise CompilepassError(f"{flag} must be >= {minimum}{why} (got {value})")


def run_trial(model, completion_len: int, *, generations: int = 2, prompt_len: int = 16, standby: bool = True,
              compile_options=False, lr: float = 1e-5, seed: int = 0, generate_tokens: Optional[int] = None,
              offload_activations: bool = False, engine_kind: str = "native", held_bytes: int = 0,
              micro_batch_size: Optional[int] = None) -> ContextTrial:
    """One GRPO step at ``completion_len`` on ``model`` (a peft model); out of memory -> ok=False.
    ``engine_kind``: native or vllm; ``held_bytes``: a device-memory cap's hold; ``micro_batch_size``:
    completions per training forward (module doc)."""
    _check_engine(engine_kind)
    _check_int("--micro-batch-size", micro_batch_size, 1, optional=True)
    _check_int("completion_len", completion_len, 1)
    _check_int("--generations", generations, 2, why=": GRPO compares completions within a group")
    _check_int("--prompt-len", prompt_len, 1)
    _check_int("--generate-tokens", generate_tokens, 1, optional=True)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    trial = ContextTrial(completion_len=completion_len, ok=False)
    engine = None
    optimizer = None
    t0 = time.perf_counter()
    try:
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        driver_peak = cuda and engine_kind == "vllm"  # vLLM's KV cache: see the module doc
        engine = _build_engine(engine_kind, model, generations, prompt_len + completion_len, compile_options)
        if engine_kind == "vllm":
            region = int(engine.llm_kwargs.get("kv_cache_memory_bytes") or 0)
        else:
            region = engine.region.nbytes if engine.region is not None else engine.cache.nbytes
        trial.kv_region_gib = _gib(region)
        vocab = engine.shape.vocab_size
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(3, vocab, (prompt_len,), generator=gen).tolist()
        n_gen = completion_len if generate_tokens is None else max(1, min(int(generate_tokens), completion_len))
        t_gen = time.perf_counter()
        gen_watch = DevicePeak(device, held_bytes) if driver_peak else contextlib.nullcontext()
        with gen_watch:
            out = engine.generate([prompt] * generations, max_new_tokens=n_gen, temperature=1.0,
                                  eos_token_id=None, seed=seed)
        completion_ids, completion_mask = out.completion_ids, out.completion_mask
        if n_gen < completion_len:  # see the module docstring: the rest is random ids
            fill = torch.randint(3, vocab, (generations, completion_len - n_gen), generator=gen).to(device)
            completion_ids = torch.cat([completion_ids, fill], 1)
            completion_mask = torch.ones_like(completion_ids)
        trial.generated_tokens = n_gen
        if cuda:
            torch.cuda.synchronize(device)
        trial.generate_s = time.perf_counter() - t_gen
        gen_peak = torch.cuda.max_memory_allocated(device) if cuda else 0
        if standby:
            engine.sleep()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        rewards = torch.arange(generations, dtype=torch.float32)
        adv, _ = group_advantages(rewards, generations)
        t_train = time.perf_counter()
        step = generations if micro_batch_size is None else min(int(micro_batch_size), generations)
        adv = adv.to(device)
        train_watch = DevicePeak(device, held_bytes) if driver_peak else contextlib.nullcontext()
        with train_watch:
            for lo in range(0, generations, step):
                hi = min(lo + step, generations)
                offload = contextlib.nullcontext()
                if offload_activations:
                    offload = ActivationOffload(model.parameters(), device=device)
                with lora_mixed_precision(model):
                    with offload:
                        logp = policy_logprobs(model, [prompt] * (hi - lo), completion_ids[lo:hi],
                                               completion_mask[lo:hi], 1.0, 0)
                    loss, _ = grpo_loss(logp, logp.detach(), None, adv[lo:hi], completion_mask[lo:hi])
                    # the group's loss is the mean over its sequences: each slice weighs its share
                    (loss * ((hi - lo) / generations)).backward()
                del logp, loss
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        trial.train_s = time.perf_counter() - t_train
        if driver_peak:  # the device's own used memory, KV cache and all, while it was mapped
            trial.gen_peak_gib = _gib(gen_watch.peak_bytes)
            trial.train_peak_gib = _gib(train_watch.peak_bytes)
            trial.peak_mem_gib = max(trial.gen_peak_gib, trial.train_peak_gib)
        elif cuda:
            train_peak = torch.cuda.max_memory_allocated(device)
            trial.gen_peak_gib = _gib(gen_peak + region)
            trial.train_peak_gib = _gib(train_peak + (0 if standby else region))
            trial.peak_mem_gib = max(trial.gen_peak_gib, trial.train_peak_gib)
        else:
            trial.peak_mem_gib = trial.gen_peak_gib = trial.train_peak_gib = peak_memory_gib()
        trial.ok = True
    except torch.OutOfMemoryError as e:
        trial.error = "out of memory: " + str(e).splitlines()[0][:200]
    except CompilepassError as e:  # e.g. the KV region cannot be mapped (StandbyError)
        trial.error = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        trial.step_s = time.perf_counter() - t0
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            # AdamW state must not leak into the next trial's memory (nor its numbers)
            optimizer.state.clear()
        for p in model.parameters():
            p.grad = None
        if engine is not None:
            engine.close()
        del engine, optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return trial


def max_context(model: str = "tiny", *, standby: bool = True, generations: int = 2, lora_rank: int = 32,
                min_len: int = 256, max_len: int = 65536, resolution: Optional[int] = None, prompt_len: int = 16,
                dtype: Optional[str] = None, device: Optional[str] = None, allow_cpu: bool = False,
                compile_options=None, generate_tokens: Optional[int] = None, offload_activations: bool = False,
                mlp_chunk_tokens: int = 4096, on_trial: Optional[Callable[[ContextTrial], None]] = None,
                device_memory_gib: Optional[float] = None, engine: str = "native",
                micro_batch_size: Optional[int] = None, load_in_4bit: bool = False) -> ContextBenchResult:
    """Search the largest completion length (per generation) for which one GRPO step fits.

    Doubling from ``min_len`` while steps fit (capped at ``max_len``), then bisection to
    ``resolution`` tokens (default ``max(1, min_len // 4)``). ``dtype``: default bfloat16 on
    CUDA, float32 on CPU. ``compile_options``: the engine's (default: "auto" on CUDA, eager on
    CPU). Raises CompilepassError on CPU unless ``allow_cpu``. ``device_memory_gib``: run on an
    N GiB card (:class:`~compilepass.standby.memory.cap.DeviceMemoryCap`, taken before the model is
    built, released at the end; recorded as ``device_memory_cap``). ``engine``: native or vllm.
    ``micro_batch_size``: completions per training forward (:func:`run_trial`). ``load_in_4bit``: a
    QLoRA base (module doc; native engine only).
    """

    _check_int("--min-len", min_len, 1)
    _check_int("--max-len", max_len, 1)
    if max_len < min_len:
        raise CompilepassError(f"need 1 <= --min-len <= --max-len (got {min_len}, {max_len})")
    _check_int("--resolution", resolution, 1, optional=True)
    _check_int("--generations", generations, 2, why=": GRPO compares completions within a group")
    _check_int("--lora-rank", lora_rank, 1)
    _check_int("--prompt-len", prompt_len, 1)
    _check_int("--generate-tokens", generate_tokens, 1, optional=True)
    _check_int("--mlp-chunk-tokens", mlp_chunk_tokens, 0, why=" (0 turns MLP tiling off)")
    _check_int("--micro-batch-size", micro_batch_size, 1, optional=True)
    _check_engine(engine)
    if load_in_4bit and engine == "vllm":
        raise CompilepassError("--load-in-4bit generates with the native engine; the vLLM engine does not share a "
                               "4-bit base (drop --engine vllm)")
    if load_in_4bit:
        from compilepass.core.quantize import require_bitsandbytes

        require_bitsandbytes()
    if dtype is not None and dtype not in DTYPES:
        raise CompilepassError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if engine == "vllm" and dev.type == "cuda" and min_len != max_len:
        raise CompilepassError("--engine vllm on CUDA measures one length per process (each trial builds a sleep-mode "
                               "vLLM engine, and vLLM allows one per process): pass --min-len equal to --max-len")
    if dev.type != "cuda" and not allow_cpu:
        raise CompilepassError("bench context measures GPU memory and needs CUDA; this machine has none "
                               "(--allow-cpu runs it on the CPU anyway, for smoke tests with small lengths)")
    resolve_model_source(model)
    if device_memory_gib is None:
        return _search(model, dev, standby, generations, lora_rank, min_len, max_len, resolution, prompt_len, dtype,
                       compile_options, generate_tokens, offload_activations, mlp_chunk_tokens, on_trial, engine, 0,
                       micro_batch_size, load_in_4bit)
    with DeviceMemoryCap(device_memory_gib, dev) as cap:
        result = _search(model, dev, standby, generations, lora_rank, min_len, max_len, resolution, prompt_len, dtype,
                         compile_options, generate_tokens, offload_activations, mlp_chunk_tokens, on_trial, engine,
                         cap.held_bytes, micro_batch_size, load_in_4bit)
        result.device_memory_cap = cap.describe()
        result.device_total_gib = result.device_memory_cap["visible_total_gib"]
    return result


def _search(model, dev, standby, generations, lora_rank, min_len, max_len, resolution, prompt_len, dtype,
            compile_options, generate_tokens, offload_activations, mlp_chunk_tokens, on_trial, engine,
            held_bytes, micro_batch_size, load_in_4bit) -> ContextBenchResult:
    tdtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if compile_options is None:
        compile_options = "auto" if dev.type == "cuda" else False
    t0 = time.perf_counter()
    base = build_model(model, dtype=tdtype, device=dev, seed=0, load_in_4bit=load_in_4bit)
    if load_in_4bit:
        from compilepass.core.quantize import prepare_4bit_for_training

        base = prepare_4bit_for_training(base)
    peft_model = add_lora(base, rank=lora_rank, alpha=2 * lora_rank, seed=0)
    causal_lm = peft_model.get_base_model()
    enable_checkpointing(causal_lm, reentrant=offload_activations)
    if mlp_chunk_tokens:
        tile_mlp(causal_lm, mlp_chunk_tokens)
    peft_model.train()
    if resolution is None:
        resolution = max(1, min_len // 4)

    trials: list[ContextTrial] = []
    cache: dict[int, ContextTrial] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            t = run_trial(peft_model, n, generations=generations, prompt_len=prompt_len, standby=standby,
                          compile_options=compile_options, generate_tokens=generate_tokens,
                          offload_activations=offload_activations, engine_kind=engine, held_bytes=held_bytes,
                          micro_batch_size=micro_batch_size)
            cache[n] = t
            trials.append(t)
            if on_trial is not None:
                on_trial(t)
        return cache[n].ok

    lo, hi = 0, None  # lo fits (0: nothing yet); hi does not
    n = min_len
    while True:
        if fits(n):
            lo = n
            if n >= max_len:
                break
            n = min(2 * n, max_len)
        else:
            hi = n
            break
    if hi is not None and lo > 0:
        while hi - lo > resolution:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
    total = None
    if dev.type == "cuda":
        total = _gib(torch.cuda.get_device_properties(dev).total_memory)
    best = cache.get(lo)
    return ContextBenchResult(model=model, device=str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
                              standby=standby, generations=generations, lora_rank=lora_rank, prompt_len=prompt_len,
                              generate_tokens=generate_tokens, offload_activations=offload_activations,
                              mlp_chunk_tokens=mlp_chunk_tokens, max_completion_len=lo, peak_mem_gib=best.peak_mem_gib if best else None,
                              device_total_gib=total, trials=trials, wall_s=time.perf_counter() - t0, engine=engine,
                              micro_batch_size=micro_batch_size, load_in_4bit=load_in_4bit)

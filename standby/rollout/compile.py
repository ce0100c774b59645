"""How the engine compiles its decode step: which Inductor options ("auto" asks a flag resolver, by
default :func:`compilepass.select`), and what gets compiled (one layer shared by all layers, or the
whole step; one symbolic-batch graph or one per bucket)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from compilepass.flags import inductor_options_for_torch
from compilepass.selection import select
from compilepass.standby.rollout import persistent_compile as persistent

log = logging.getLogger(__name__)

#: ``flag_resolver(model, workload, *, batch, dtype)`` -> a Selection (``.flags``) or a dict of flags.
FlagResolver = Callable[..., object]


def resolve_persist_dir(persistent_compile) -> Optional[Path]:
    """None -> the default directory when this torch can persist compiled functions and
    ``COMPILEPASS_PRECOMPILE`` is not "0", else None; False -> None; a path -> that path."""
    if persistent_compile is False:
        return None
    if persistent_compile is None or persistent_compile is True:
        if not persistent.enabled():
            if persistent_compile is True:
                log.warning("persistent_compile=True: this torch (%s) has no AOT precompile; compiling per process",
                            torch.__version__)
            return None
        return persistent.default_dir()
    return Path(persistent_compile)


def resolve_options(model, compile_options, batch: int, dtype, resolver: FlagResolver = select):
    """None -> torch's defaults ({}); "auto" -> ``resolver``'s flags for this model (default
    :func:`compilepass.select`: the tuning database, workload "rollout"), torch's defaults if it
    fails; False -> no compile (eager); a dict as is."""
    if compile_options is False:
        return None
    if compile_options is None:
        return {}
    if compile_options == "auto":
        try:
            chosen = resolver(model, "rollout", batch=batch, dtype=dtype)
        except Exception as exc:  # a selection failure must not stop generation
            log.warning("compile_options='auto': selection failed (%s), using torch's defaults", exc)
            return {}
        return dict(getattr(chosen, "flags", chosen) or {})
    if isinstance(compile_options, dict):
        return dict(compile_options)
    raise TypeError(f"compile_options must be None, 'auto', False or a dict, got {compile_options!r}")


def make_decode_step(decoder, options: Optional[dict], *, scope: str, dynamic_batch: bool, backend: str,
                     max_batch: int, persist_dir=None) -> Callable:
    """``(tokens [B], positions [B]) -> logits [B, V]``: ``decoder.decode_step`` eager (``options``
    None), with its layers compiled (``scope="layer"``; ``persist_dir``: the compiled layer kept
    there for later processes, see :mod:`.persistent_compile`), or compiled whole (``"step"``)."""
    if options is None:
        return decoder.decode_step
    options = inductor_options_for_torch(options)
    if scope == "layer":
        decoder.compile_layers(options, dynamic_batch=dynamic_batch, backend=backend, max_batch=max_batch,
                               persist_dir=persist_dir)
        return decoder.decode_step
    if backend != "inductor":  # e.g. dynamo's "eager": the engine's plumbing without Inductor
        return torch.compile(decoder.decode_step, backend=backend, fullgraph=True,
                             dynamic=None if dynamic_batch else False)
    if not dynamic_batch:
        return decoder.compiled_decode_step(options)
    return torch.compile(decoder.decode_step, options=options or None, fullgraph=True, dynamic=None)


@contextlib.contextmanager
def compile_limits():
    """One compiled graph per bucket (dynamic=False), possibly several engines per process: raise
    dynamo's recompile limit for the warm-up so no bucket falls back to eager."""
    import torch._dynamo.config as dc  # torch._dynamo only once something compiles

    name = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"
    with dc.patch(**{name: max(getattr(dc, name), 4096)}):
        yield


def start_compile_workers(device, compile_options=True, backend: str = "inductor") -> bool:
    """Start Inductor's compile subprocesses now, if a Triton compile is to come on ``device``: True if
    they were started (or already were).

    Inductor starts its worker pool when the first graph reaches it, and compiles every kernel in the
    calling process until the workers have imported torch and Triton (seconds): on the H200 a fresh
    process built the qwen3-0.6b engine in 18.0 s against 10.0 s in a process where transformers had
    compiled first (``rollout_compiled_prefill_h200_2026-12-03.json``, ``rollout_h200_2026-12-01.json``).
    Called before the model is loaded, the workers boot while it loads. Off (False) for eager runs,
    other backends, CPU devices (the pool serves the Triton backend only) and where torch's own switch
    ``TORCH_WARM_POOL=0`` or ``TORCHINDUCTOR_COMPILE_THREADS=1`` says so."""
    if compile_options is False or compile_options is None or backend != "inductor":
        return False
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torch._inductor import async_compile
        from torch._inductor import config as inductor_config
    except ImportError:  # pragma: no cover - a torch without Inductor
        return False
    warm = getattr(async_compile, "maybe_warm_pool", None)
    threads = getattr(async_compile, "get_compile_threads", None)
    n = threads() if threads is not None else int(getattr(inductor_config, "compile_threads", 1) or 1)
    if warm is None or n <= 1:
        return False
    warm()
    return True

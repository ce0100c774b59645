"""CUDA-graph capture without a full ``gc.collect()`` per graph.

Before torch 2.9, ``torch.cuda.graph.__enter__`` called ``gc.collect()`` on every capture; torch
>= 2.9 does so only when ``torch.compiler.config.force_cudagraph_gc`` is on (environment variable
``TORCH_CUDAGRAPH_GC=1`` at import). vLLM's model runner also collects around its capture. With
millions of live Python objects each full collection takes about half a second, so capturing a
few dozen graphs costs tens of seconds of pure garbage collection.

:func:`suppress_gc_during_capture` removes that cost. Exactly what it patches, for the duration
of the outermost ``with`` block, and nothing else:

1. ``gc.collect``, the attribute of the ``gc`` module, is replaced by :func:`_suppressed_collect`.
   Every call site that looks the name up when it runs is covered: ``gc.collect()`` in
   ``torch.cuda.graphs`` (which does ``import gc`` and calls ``gc.collect()``), in vLLM's
   ``capture_model`` and graph wrappers, and in user code. A full collection request (the
   default, generation 2) is counted and skipped, returning 0. Young-generation requests
   (``gc.collect(0)``, ``gc.collect(1)``) still run: they only scan young objects and are cheap.
   A reference bound before entry (``from gc import collect``) is NOT covered.
2. On entry, one real collection of the young generations (``gc.collect(1)``: what the
   warm-up calls just before capture dropped; milliseconds at any heap size), or a full one
   with ``collect_first="full"`` (as long as one per-capture collection: 0.24 s at 3M objects on
   the benchmark machine), or none with ``collect_first="none"``; then
   ``gc.freeze()``: every live object moves to the
   permanent generation, so even a threshold-triggered automatic full collection during capture
   does not scan them. On exit, ``gc.unfreeze()``. If the permanent generation was not empty on
   entry (someone froze the heap on purpose, e.g. vLLM's startup heap freeze), the freeze state
   is left exactly as it was: no freeze, no unfreeze.

On exit (also when the body raises) ``gc.collect`` is restored and the freeze undone. Nested use
is safe: only the outermost block patches and restores. The patch is process-wide: other threads
calling ``gc.collect()`` meanwhile are suppressed too. ``torch.compiler.config`` is not touched.

When the running torch does not collect per capture and vLLM is not loaded, the context does
nothing but log one line (pass ``force=True`` to apply it anyway, as the benchmark does).
"""

from __future__ import annotations

import contextlib
import dis
import functools
import gc
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

log = logging.getLogger(__name__)

__all__ = [
    "GCSuppression",
    "suppress_gc_during_capture",
    "capture_collects_per_graph",
    "patch_vllm_capture",
    "unpatch_vllm_capture",
    "VLLM_CAPTURE_TARGETS",
]

#: Where vLLM keeps the method that captures all CUDA graphs, newest layout first:
#: (module, class, method). Each one present in the installed vLLM is wrapped.
VLLM_CAPTURE_TARGETS: Tuple[Tuple[str, str, str], ...] = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "capture_model"),  # V1 engine
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "capture_model"),  # model runner V2
    ("vllm.worker.model_runner", "GPUModelRunnerBase", "capture_model"),  # V0 engine (< 0.11)
)

_PATCH_MARK = "__compilepass_gc_patched__"


@dataclass
class GCSuppression:
    """What one :func:`suppress_gc_during_capture` block did (shared by nested blocks)."""

    active: bool
    reason: str
    froze: bool = False
    entry_collect_s: float = 0.0
    suppressed_full_collects: int = 0
    young_collects_run: int = 0
    depth: int = 0
    notes: List[str] = field(default_factory=list)


_REAL_COLLECT = gc.collect  # as found at import, for recovery only
_lock = threading.RLock()
_depth = 0
_original_collect: Optional[Callable[..., int]] = None
_active: Optional[GCSuppression] = None
_logged_inactive: set = set()


def _suppressed_collect(generation: int = 2) -> int:
    """Stands in for ``gc.collect`` inside :func:`suppress_gc_during_capture`."""
    original = _original_collect or gc.collect
    stats = _active
    if generation in (0, 1):
        if stats is not None:
            stats.young_collects_run += 1
        return original(generation)
    if generation != 2:
        return original(generation)  # let gc raise its own error for a bad generation
    if stats is not None:
        stats.suppressed_full_collects += 1
    return 0


# --------------------------------------------------------------------------------- detection


def _torch_version_tuple(version: str) -> Tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _calls_gc_collect(func) -> bool:
    """Whether ``func``'s bytecode loads a global ``gc`` and then its attribute ``collect``."""
    try:
        instructions = list(dis.get_instructions(func))
    except TypeError:
        return False
    for a, b in zip(instructions, instructions[1:]):
        if a.opname in ("LOAD_GLOBAL", "LOAD_NAME") and a.argval == "gc" and b.argval == "collect":
            return True
    return False


def capture_collects_per_graph() -> Tuple[bool, str]:
    """Whether the running torch calls ``gc.collect()`` on every CUDA-graph capture, and why.

    Reads the code of ``torch.cuda.graphs.graph.__enter__`` (and ``CUDAGraph.capture_begin``
    where it is Python): no ``gc.collect`` call means no; a call guarded by
    ``force_cudagraph_gc`` means the value of ``torch.compiler.config.force_cudagraph_gc`` (set
    from ``TORCH_CUDAGRAPH_GC`` when torch is imported); an unguarded call means yes. When the
    code cannot be read, falls back to the version: torch < 2.9 collects, later ones only with
    ``TORCH_CUDAGRAPH_GC=1``.
    """
    try:
        import torch
        import torch.cuda.graphs as graphs
    except ImportError:
        return False, "torch is not installed"
    version = torch.__version__
    sites = [getattr(getattr(graphs, "graph", None), "__enter__", None)]
    cuda_graph = getattr(graphs, "CUDAGraph", None)
    sites.append(getattr(cuda_graph, "capture_begin", None))
    sites = [s for s in sites if inspect.isfunction(s)]
    calling = [s for s in sites if _calls_gc_collect(s)]
    if sites and not calling:
        names = ", ".join(s.__qualname__ for s in sites)
        return False, f"torch {version} does not call gc.collect() when capturing ({names})"
    if calling:
        try:
            source = "\n".join(inspect.getsource(s) for s in calling)
        except (OSError, TypeError):
            source = None
        if source is not None and "force_cudagraph_gc" in source:
            config = getattr(getattr(torch, "compiler", None), "config", None)
            on = bool(getattr(config, "force_cudagraph_gc", _env_flag("TORCH_CUDAGRAPH_GC")))
            env = os.environ.get("TORCH_CUDAGRAPH_GC")
            return on, (
                f"torch {version} calls gc.collect() per capture only when "
                f"torch.compiler.config.force_cudagraph_gc is on; it is {'on' if on else 'off'} "
                f"(TORCH_CUDAGRAPH_GC={env!r} in this process's environment)"
            )
        where = ", ".join(s.__qualname__ for s in calling)
        return True, f"torch {version} calls gc.collect() on every capture ({where})"
    # Code not readable: decide by version and environment.
    if _torch_version_tuple(version) < (2, 9):
        return True, f"torch {version} < 2.9 calls gc.collect() on every capture (by version)"
    on = _env_flag("TORCH_CUDAGRAPH_GC")
    return on, (
        f"torch {version} >= 2.9 collects per capture only with TORCH_CUDAGRAPH_GC=1 "
        f"(by version; it is {'set' if on else 'unset'})"
    )


# ------------------------------------------------------------------------------------ patch


def _vllm_loaded() -> bool:
    return "vllm" in sys.modules


#: ``collect_first`` values -> the generation collected on entry (None: no collection)
ENTRY_COLLECTIONS = {"young": 1, "full": 2, "none": None, True: 1, False: None}


def _entry_generation(collect_first) -> Optional[int]:
    try:
        return ENTRY_COLLECTIONS[collect_first]
    except (KeyError, TypeError):
        raise ValueError(f"collect_first must be 'young', 'full' or 'none' (got {collect_first!r})") from None


def _activate(reason: str, collect_first="young") -> GCSuppression:
    """Outermost entry: one real collection, freeze, patch gc.collect. Caller holds _lock."""
    global _original_collect, _active
    stats = GCSuppression(active=True, reason=reason, depth=1)
    original = gc.collect
    if original is _suppressed_collect:  # pragma: no cover - only after a broken restore
        original = _REAL_COLLECT
    generation = _entry_generation(collect_first)
    if generation is not None:
        t0 = time.perf_counter()
        original(generation)
        stats.entry_collect_s = time.perf_counter() - t0
        stats.notes.append(f"collected generation 0..{generation} on entry")
    else:
        stats.notes.append("no collection on entry (collect_first='none')")
    if gc.get_freeze_count() == 0:
        gc.freeze()
        stats.froze = True  # (not counted: gc.get_freeze_count() walks every frozen object)
    else:
        stats.notes.append(
            f"{gc.get_freeze_count()} objects were already frozen on entry: freeze state left as is"
        )
    _original_collect = original
    _active = stats
    gc.collect = _suppressed_collect
    return stats


def _deactivate(stats: GCSuppression) -> None:
    """Outermost exit: restore gc.collect and undo our freeze. Caller holds _lock."""
    global _original_collect, _active
    try:
        if gc.collect is not _suppressed_collect:
            log.warning(
                "gc.collect was replaced by %r inside suppress_gc_during_capture and not restored; "
                "restoring the original gc.collect",
                gc.collect,
            )
        gc.collect = _original_collect
    finally:
        if stats.froze:
            gc.unfreeze()
        _original_collect = None
        _active = None


@contextlib.contextmanager
def suppress_gc_during_capture(
    force: bool = False, *, collect_first="young"
) -> Iterator[GCSuppression]:
    """Capture CUDA graphs inside this block without a full ``gc.collect()`` per graph.

    Applies the patch (see the module docstring) when the running torch collects per capture
    (:func:`capture_collects_per_graph`), when vLLM is loaded, or when ``force`` is true;
    otherwise logs one line and changes nothing. Yields a :class:`GCSuppression` that says
    what was done and counts the skipped collections.

    ``collect_first``: ``"young"`` (default) collects generations 0 and 1 on entry — the
    garbage of the warm-up calls that precede a capture — in milliseconds; ``"full"`` runs one
    full collection (as costly as one per-capture collection: 0.24 s at 3M objects), for
    garbage cycles that survived into the old generation; ``"none"`` collects nothing. Garbage
    not collected on entry is frozen with everything else and left to the normal collector
    after exit (it costs memory for the graphs' pool, never correctness). Nested blocks ignore
    both arguments: the outermost block decides.
    """
    global _depth
    with _lock:
        if _depth > 0:
            _depth += 1
            stats = _active
            stats.depth = max(stats.depth, _depth)
            nested = True
        else:
            nested = False
            collects, why = capture_collects_per_graph()
            vllm = _vllm_loaded()
            if force or collects or vllm:
                if force:
                    reason = f"forced ({why})"
                elif collects:
                    reason = why
                else:
                    reason = f"vLLM is loaded and collects around its capture ({why})"
                stats = _activate(reason, collect_first)
                _depth = 1
                log.info(
                    "gc patch on: gc.collect suppressed%s (%s)",
                    ", live objects frozen" if stats.froze else "",
                    reason,
                )
            else:
                message = f"gc patch not applied: {why}, and vLLM is not loaded"
                level = logging.INFO if message not in _logged_inactive else logging.DEBUG
                _logged_inactive.add(message)
                log.log(level, message)
                stats = GCSuppression(active=False, reason=message)
    if not stats.active:
        yield stats
        return
    try:
        yield stats
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _deactivate(stats)
                log.info(
                    "gc patch off: skipped %d full gc.collect() call(s)%s",
                    stats.suppressed_full_collects,
                    "" if nested else f", entry collection took {stats.entry_collect_s:.3f} s",
                )


# --------------------------------------------------------------------------------------- vLLM

_vllm_patched: List[Tuple[type, str, Callable]] = []


def _vllm_available() -> bool:
    if "vllm" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def _wrap_capture(method: Callable) -> Callable:
    @functools.wraps(method)
    def capture_model(self, *args, **kwargs):
        with suppress_gc_during_capture(force=True) as stats:
            result = method(self, *args, **kwargs)
        log.info(
            "%s: skipped %d full gc.collect() call(s) during CUDA-graph capture",
            method.__qualname__,
            stats.suppressed_full_collects,
        )
        return result

    setattr(capture_model, _PATCH_MARK, True)
    capture_model.__wrapped_capture__ = method
    return capture_model


def patch_vllm_capture() -> bool:
    """Wrap vLLM's GPU model runner ``capture_model`` in :func:`suppress_gc_during_capture`.

    Looks for every entry of :data:`VLLM_CAPTURE_TARGETS` in the installed vLLM and wraps the
    ones found (once; calling again is harmless). Returns whether any capture method is patched
    now. Without vLLM it logs one line and returns False.

    The patch lives in this process: vLLM's V1 engine runs the model runner in a separate
    process unless ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so call this in the process that
    builds the runner (compilepass's in-process engine does).
    """
    if not _vllm_available():
        log.info("vLLM is not installed: no vLLM capture to patch")
        return False
    patched_any = False
    looked = []
    for module_name, class_name, method_name in VLLM_CAPTURE_TARGETS:
        looked.append(f"{module_name}.{class_name}.{method_name}")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        except Exception as exc:  # a vLLM module that fails to import here (no GPU, ...)
            log.warning("cannot import %s to patch its capture: %s", module_name, exc)
            continue
        cls = getattr(module, class_name, None)
        method = cls.__dict__.get(method_name) if isinstance(cls, type) else None
        if not callable(method):
            continue
        if getattr(method, _PATCH_MARK, False):
            patched_any = True
            continue
        setattr(cls, method_name, _wrap_capture(method))
        _vllm_patched.append((cls, method_name, method))
        patched_any = True
        log.info("patched %s.%s.%s with the gc capture patch", module_name, class_name, method_name)
    if not patched_any:
        version = getattr(sys.modules.get("vllm"), "__version__", "?")
        log.warning(
            "vLLM %s is installed but none of its known capture methods was found (looked for %s); "
            "CUDA-graph capture is not patched",
            version,
            ", ".join(looked),
        )
    return patched_any


def unpatch_vllm_capture() -> int:
    """Undo :func:`patch_vllm_capture`; returns how many methods were restored."""
    count = 0
    while _vllm_patched:
        cls, name, method = _vllm_patched.pop()
        setattr(cls, name, method)
        count += 1
    return count

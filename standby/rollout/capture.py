"""CUDA-graph capture for the rollout engine: warm up on a side stream, then capture each item.

One helper serves both graphs the engine captures: the logits-only decode step per batch bucket
and the step + sampler graph per (bucket, sampler). The warm-up (compile, autotune, cuBLAS
workspaces) runs on a side stream, outside any capture, so that nothing a first call does ends up
in a graph; every capture shares the engine's one memory pool and runs inside
:func:`compilepass.gc_patch.suppress_gc_during_capture` (no full ``gc.collect`` per graph). A
capture that fails logs one warning and leaves its item without a graph: the engine then runs
that item's step eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

from compilepass.gc_patch import suppress_gc_during_capture

log = logging.getLogger(__name__)

__all__ = ["Captured", "capture_graphs"]


@dataclass
class Captured:
    """What :func:`capture_graphs` did: ``graphs`` item -> (graph, the body's output: static
    tensors that each replay overwrites), ``failed`` the items left without a graph, ``error``
    the last capture error (truncated), ``warmup_s`` / ``capture_s`` wall seconds of each phase."""

    graphs: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)
    error: Optional[str] = None
    warmup_s: float = 0.0
    capture_s: float = 0.0


def capture_graphs(items: Sequence[Hashable], body: Callable[[Any], Any], *, device: torch.device, pool,
                   warmup: Optional[Callable[[], None]] = None, before: Optional[Callable[[Any], None]] = None,
                   generator: Optional[Callable[[Any], Optional[torch.Generator]]] = None,
                   describe: Callable[[Any], str] = str, stop_at_failure: bool = False) -> Captured:
    """Run ``warmup()`` (if given) on a side stream, then capture ``body(item)`` for each item into
    a ``torch.cuda.CUDAGraph`` in memory pool ``pool``.

    ``before(item)`` runs just before each capture, outside it (reset the static state the body
    advances); ``generator(item)``, if it returns a generator, is registered with the item's graph
    (graph-safe RNG: each replay draws fresh numbers from it). ``describe(item)`` names the item in
    the warning. On a failed capture: ``stop_at_failure`` leaves this item and all later ones
    without a graph (none is tried after it), else only this one (the device synchronized, the
    next one tried). ``items`` may be empty (a warm-up only).
    """
    out = Captured()
    if warmup is not None:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            warmup()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        out.warmup_s = time.perf_counter() - t0
    if not items:
        return out
    t1 = time.perf_counter()
    with suppress_gc_during_capture():
        for i, item in enumerate(items):
            if before is not None:
                before(item)
            graph = torch.cuda.CUDAGraph()
            try:
                gen = generator(item) if generator is not None else None
                if gen is not None:
                    graph.register_generator_state(gen)
                with torch.cuda.graph(graph, pool=pool):
                    result = body(item)
            except Exception as exc:  # keep generating: the item runs without a graph
                out.error = f"{type(exc).__name__}: {exc}"[:2000]
                first = out.error.splitlines()[0][:300]
                if stop_at_failure:
                    out.failed.extend(items[i:])
                    log.warning("CUDA-graph capture of %s failed (%s); %s run without a graph", describe(item),
                                first, ", ".join(describe(x) for x in items[i:]))
                    break
                out.failed.append(item)
                log.warning("CUDA-graph capture of %s failed (%s); it runs without a graph", describe(item), first)
                torch.cuda.synchronize(device)
            else:
                out.graphs[item] = (graph, result)
    torch.cuda.synchronize(device)
    out.capture_s = time.perf_counter() - t1
    return out

"""Shared Triton plumbing: availability, one kernel object per device kind, tile-config tuning.

Kernel bodies in this package are plain Python functions written in the Triton language. They are
turned into launchable kernels here, lazily and per device kind:

* CUDA tensors -> ``triton.jit(fn)`` (compiled);
* any other device (CPU) -> ``triton.runtime.interpreter.InterpretedFunction(fn)``, the Triton
  interpreter, *whether or not* ``TRITON_INTERPRET=1`` was set before ``import triton``.

This is why the kernel bodies call only Triton *builtins* (``tl.full`` instead of ``tl.zeros``,
``tl.reduce(x, axis, tl.standard._sum_combine)`` instead of ``tl.sum``): ``tl.sum`` and friends are
themselves ``@triton.jit`` functions, compiled-mode objects when triton was imported without the
interpreter flag, and the interpreter cannot call them. The standard combine functions keep the
interpreter on its fast numpy path and compile to exactly what ``tl.sum``/``tl.max`` compile to.
"""

from __future__ import annotations

import functools
import importlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Hashable, List, Sequence

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (it does not say that a GPU is present)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


_KERNELS: Dict[tuple, object] = {}


def kernel_for(fn: Callable, device: torch.device):
    """The launchable kernel for Triton-language function ``fn`` on ``device`` (cached)."""
    compiled = device.type == "cuda"
    key = (fn, compiled)
    kernel = _KERNELS.get(key)
    if kernel is None:
        import triton

        if compiled:
            kernel = triton.jit(fn)  # an InterpretedFunction if TRITON_INTERPRET=1 was set
        else:
            from triton.runtime.interpreter import InterpretedFunction

            kernel = InterpretedFunction(fn)
        _KERNELS[key] = kernel
    return kernel


def is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch options of one GEMM-shaped kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3

    def launch_options(self, interpreted: bool) -> dict:
        return {} if interpreted else {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_dict(self) -> dict:
        return asdict(self)


# Tile configs for the interpreter (CPU tests): small, so that the interpreter is quick.
INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=1)

_TUNED: Dict[Hashable, TileConfig] = {}
_TUNE_LOG: List[dict] = []


def tuning_enabled() -> bool:
    return os.environ.get("COMPILEPASS_KERNELS_TUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def pick_config(
    key: Hashable,
    candidates: Sequence[TileConfig],
    launch: Callable[[TileConfig], None],
    reps: int = 3,
) -> TileConfig:
    """Choose the fastest of ``candidates`` for ``key`` by timing ``launch(cfg)`` on the GPU, once.

    ``launch`` must be idempotent (it writes, never accumulates). A candidate that fails to compile
    or launch (too much shared memory, ...) is skipped and recorded. With tuning disabled
    (``COMPILEPASS_KERNELS_TUNE=0``) or a single candidate, the first candidate is used untimed.
    """
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if len(candidates) == 1 or not tuning_enabled() or not torch.cuda.is_available():
        _TUNED[key] = candidates[0]
        _TUNE_LOG.append({"key": repr(key), "chosen": candidates[0].to_dict(), "timed": False})
        return candidates[0]
    results = []
    for cand in candidates:
        try:
            launch(cand)  # compile + warm up
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(reps):
                start.record()
                launch(cand)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            results.append({"config": cand.to_dict(), "ms": min(times)})
        except Exception as exc:  # noqa: BLE001 - a config that cannot run is a result, not a failure
            torch.cuda.synchronize()
            results.append({"config": cand.to_dict(), "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    timed = [(r["ms"], i) for i, r in enumerate(results) if "ms" in r]
    if not timed:
        raise RuntimeError(f"no tile config could run for {key!r}: {results}")
    best = candidates[min(timed)[1]]
    _TUNED[key] = best
    _TUNE_LOG.append({"key": repr(key), "chosen": best.to_dict(), "timed": True, "results": results,
                      "at": time.time()})
    return best


def tuning_report() -> List[dict]:
    """What ``pick_config`` chose so far in this process (for benchmark records)."""
    return list(_TUNE_LOG)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with a float32 result and float32 accumulation, for 16-bit or 32-bit inputs.

    Uses ``torch.mm(..., out_dtype=torch.float32)`` (cuBLAS with an fp32 C matrix) where this torch
    build has it for the device; otherwise the plain product (16-bit result of an fp32-accumulated
    GEMM), which callers accumulate into fp32.
    """
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    out = _with_out_dtype(a.device.type, lambda: torch.mm(a, b, out_dtype=torch.float32))
    return torch.mm(a, b) if out is None else out


#: Per op and device kind, whether this torch build's ``out_dtype`` overload worked (absent: not tried yet).
_MM_OUT_DTYPE_OK: Dict[str, bool] = {}


def _with_out_dtype(key: str, call: Callable[[], torch.Tensor]):
    """``call()`` (a GEMM through an ``out_dtype=torch.float32`` overload), or None when that overload
    is missing for ``key`` (op and device kind): remembered after its first failure. Out of memory is
    raised, not taken for a missing overload."""
    if not _MM_OUT_DTYPE_OK.get(key, True):
        return None
    try:
        return call()
    except torch.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError, NotImplementedError):  # this build has no such kernel for the device
        _MM_OUT_DTYPE_OK[key] = False
        return None


def addmm_fp32_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` into the float32 ``acc``, for 16-bit or 32-bit ``a``, ``b``.

    Uses ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` (the GEMM adds into ``acc`` in
    its epilogue: one read and one write of it) where this torch build has it for the device;
    otherwise :func:`mm_fp32_out` then an add (a temporary of ``acc``'s size, read twice more)."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    out = _with_out_dtype("addmm:" + acc.device.type,
                          lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc))
    return acc.add_(mm_fp32_out(a, b)) if out is None else out

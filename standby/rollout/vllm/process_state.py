"""What building vLLM's engine core in this process changes for the trainer, and putting it back.

With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine core is built in the trainer's own process. Read
in vLLM 0.26's source, that build:

- caches every ``VLLM_*`` variable for the rest of the process (``vllm.envs.enable_envs_cache`` in
  ``EngineCore.__init__``), so a second engine would read the first one's values, not the ones
  :class:`~compilepass.standby.rollout.vllm.engine.VllmEngine` sets around its build;
- reseeds Python's ``random``, NumPy and torch (CPU and CUDA) with the engine's seed
  (``set_random_seed`` in the GPU worker), which would change the trainer's random streams;
- freezes the garbage collector's heap (``gc.freeze()``), after which nothing alive at that moment,
  the trainer's objects included, is ever scanned for cycles again;
- installs a Triton JIT monitor (``triton.knobs.runtime.jit_post_compile_hook``,
  ``triton.knobs.autotuning.print``) that reports the trainer's later Triton compiles as warnings;
- sets torch's float32 matmul precision from ``VLLM_FLOAT32_MATMUL_PRECISION`` (``"highest"`` by
  default, in the GPU worker's constructor), replacing the trainer's own setting.

:func:`vllm_build_scope` wraps the build: it turns the variable cache off before it, and after it
restores the random states, the float32 matmul precision, the heap's freeze state and those Triton
settings. :func:`gc_freezes_undone` is the freeze part alone, for every later call into vLLM: on the
H200 (vLLM 0.26, session 11) the heap was found frozen after the engine was built and had generated
once, so each call records where ``gc.freeze()`` was called from and undoes it. In session 13 the
heap already held 375 frozen objects before the build (who froze them is not known yet) and vLLM's
two ``freeze_gc_heap`` calls (``EngineCore.__init__``, the GPU worker's warm-up) then froze all of it,
which the first version, leaving any earlier freeze alone, did not undo.
:func:`cumem_bytes_in_use` is what vLLM's CuMem pool (used by sleep-mode engines) holds in this
process: vLLM allows one such engine per process.
"""

from __future__ import annotations

import contextlib
import gc
import random
import sys
from typing import Iterator, Optional

import torch

__all__ = ["cumem_bytes_in_use", "gc_freezes_undone", "vllm_build_scope"]

_TRITON_KNOBS = (("runtime", "jit_post_compile_hook"), ("autotuning", "print"))


def cumem_bytes_in_use() -> int:
    """Bytes held by vLLM's CuMem allocator in this process (0 when it is absent or unused)."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator

        return int(CuMemAllocator.get_instance().get_current_usage())
    except Exception:  # noqa: BLE001 - no CUDA build, no cumem extension: nothing is held
        return 0


def _triton_knobs() -> dict:
    try:
        import triton
    except Exception:  # noqa: BLE001 - no Triton: nothing to keep
        return {}
    knobs = getattr(triton, "knobs", None)
    saved = {}
    for group, name in _TRITON_KNOBS:
        holder = getattr(knobs, group, None)
        if holder is not None and hasattr(holder, name):
            saved[(group, name)] = (holder, getattr(holder, name))
    return saved


def _disable_envs_cache() -> None:
    with contextlib.suppress(Exception):
        import vllm.envs as envs

        if hasattr(envs, "disable_envs_cache"):
            envs.disable_envs_cache()


@contextlib.contextmanager
def gc_freezes_undone(sites: Optional[dict] = None) -> Iterator[None]:
    """Within: every ``gc.freeze()`` call is counted in ``sites`` under its caller's ``file:line``.
    After: if ``gc.freeze()`` was called inside (or more objects are frozen than on entry: a freeze
    this recorder did not see), the heap is unfrozen, an earlier
    freeze's objects with it (``gc.unfreeze`` cannot tell them apart; a freeze only spares the collector
    work). A heap frozen on entry and not frozen further is left as it is. Nested uses restore each
    other's ``gc.freeze`` in order."""
    sites = {} if sites is None else sites
    frozen_before = gc.get_freeze_count()
    real_freeze = gc.freeze
    calls = [0]

    def recording_freeze():
        caller = sys._getframe(1)
        while caller.f_back is not None and caller.f_code.co_filename == __file__:  # a nested recorder's frame
            caller = caller.f_back
        site = f"{caller.f_code.co_filename}:{caller.f_lineno}"
        sites[site] = sites.get(site, 0) + 1
        calls[0] += 1
        real_freeze()

    gc.freeze = recording_freeze
    try:
        yield
    finally:
        if gc.freeze is recording_freeze:
            gc.freeze = real_freeze
        if calls[0] or gc.get_freeze_count() > frozen_before:
            # someone froze inside (vLLM's freeze_gc_heap moves the whole heap to the permanent
            # generation). gc.unfreeze() cannot tell those objects from an earlier freeze's, so it
            # releases both: freezing only spares the collector work, unfreezing never changes results
            gc.unfreeze()


@contextlib.contextmanager
def vllm_build_scope(freeze_sites: Optional[dict] = None) -> Iterator[None]:
    """Around ``vllm.LLM(...)``: see the module docstring. ``freeze_sites`` collects where vLLM
    froze the heap (see :func:`gc_freezes_undone`)."""
    _disable_envs_cache()
    py_state = random.getstate()
    np_state = None
    with contextlib.suppress(Exception):
        import numpy as np

        np_state = np.random.get_state()
    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    matmul_precision = torch.get_float32_matmul_precision()
    knobs = _triton_knobs()
    try:
        with gc_freezes_undone(freeze_sites):
            yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            import numpy as np

            np.random.set_state(np_state)
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        torch.set_float32_matmul_precision(matmul_precision)
        for (group, name), (holder, value) in knobs.items():
            with contextlib.suppress(Exception):
                setattr(holder, name, value)

"""KV-only standby on vLLM builds that have no ``LLM.release_kv_cache_memory`` (vLLM 0.26 and older).

vLLM's sleep mode puts every allocation made while it sets up the KV cache into the cumem pool tagged
``kv_cache``. ``LLM.sleep(level=1)`` would also offload the weights, which the trainer shares, and the
``kv_cache`` tag alone is not safe to drop on such builds: before vllm-project/vllm#53508 the whole of
``initialize_kv_cache`` ran inside that pool (on 0.26's V2 model runner too), so block tables,
attention metadata, CUDA-graph input buffers and other tensors that live for the engine's lifetime
sit there, some in the same physical allocations as KV-cache tensors (vllm-project/vllm#53343), and
would come back as garbage after a wake.

This module releases the ``kv_cache``-tagged cumem allocations (one physical allocation per segment
of torch's caching allocator) that hold KV-cache tensor memory, and *preserves* every other live
block in them: before the unmap, each live block of ``torch.cuda.memory_snapshot()`` that is not
inside one of the model runner's KV-cache tensors is copied to pinned host memory; after the
allocations are mapped again at the same virtual addresses (vLLM's ``create_and_map``), the KV
tensors are zeroed, those bytes copied back, and the model runner's ``post_kv_cache_wake_up`` runs.
Engine metadata comes back bit for bit (kilobytes to megabytes of host copies); the KV cache's
bytes are given back to the device. Allocations without any KV-cache block stay mapped. Captured
CUDA graphs keep working: no address moves.

:func:`plan_release` is the selection as a pure function (tested on CPU); :class:`CuMemKvRelease`
applies it to a live in-process ``vllm.LLM``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

KV_TAG = "kv_cache"


@dataclass
class ReleasePlan:
    """Which ``kv_cache``-tagged allocations may be released, and why the others may not."""

    release: list[int] = field(default_factory=list)  # allocation start addresses
    release_bytes: int = 0
    kept: dict[int, str] = field(default_factory=dict)  # address -> reason it stays mapped
    kv_bytes: int = 0  # bytes of the KV-cache tensors' storages
    kv_bytes_covered: int = 0  # of which inside a released allocation
    preserve: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of live non-KV blocks released
    preserve_bytes: int = 0


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _minus(lo: int, hi: int, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [lo, hi) outside every range of ``ranges`` (merged, sorted)."""
    out, at = [], lo
    for a, b in ranges:
        if b <= at or a >= hi:
            continue
        if a > at:
            out.append((at, a))
        at = max(at, b)
        if at >= hi:
            break
    if at < hi:
        out.append((at, hi))
    return out


def _live_extent(block: dict) -> tuple[int, int]:
    """[start, end) of what a live block holds: its requested bytes where the snapshot records them
    (torch keeps a block unsplit when the slack is small, so ``size`` can run past the tensor)."""
    lo = int(block["address"])
    n = int(block.get("requested_size") or block["size"])
    return lo, lo + min(n, int(block["size"]))


def plan_release(allocations: Iterable[tuple[int, int, str]], snapshot: Sequence[dict],
                 kv_ranges: Iterable[tuple[int, int]]) -> ReleasePlan:
    """``allocations``: (address, size, tag) of every cumem allocation; ``snapshot``: the segments of
    ``torch.cuda.memory_snapshot()`` (``address``, ``total_size``, ``blocks`` with ``address``,
    ``size``, ``requested_size``, ``state``); ``kv_ranges``: [start, end) of each KV-cache tensor's
    storage. An allocation is released if it is tagged ``kv_cache``, torch's snapshot knows it as
    one segment of the same extent, and a KV range overlaps one of its live blocks; the live bytes
    outside every KV range are listed in ``preserve`` (copied out and back around the release)."""
    kv = _merge(kv_ranges)
    plan = ReleasePlan(kv_bytes=sum(hi - lo for lo, hi in kv))
    segments = {int(s["address"]): s for s in snapshot}
    for addr, size, tag in allocations:
        if tag != KV_TAG:
            continue
        seg = segments.get(int(addr))
        if seg is None or int(seg.get("total_size", -1)) != int(size):
            plan.kept[addr] = "torch's memory snapshot has no segment of this extent"
            continue
        live = [_live_extent(b) for b in seg.get("blocks", []) if b.get("state") != "inactive"]
        if not live:
            plan.kept[addr] = "no live block (nothing of the KV cache in it)"
            continue
        other = [piece for lo, hi in live for piece in _minus(lo, hi, kv)]
        if sum(hi - lo for lo, hi in other) == sum(hi - lo for lo, hi in live):
            plan.kept[addr] = f"no KV-cache tensor in it ({len(live)} live block(s) of engine metadata)"
            continue
        plan.release.append(addr)
        plan.release_bytes += int(size)
        plan.preserve.extend(other)
        plan.preserve_bytes += sum(hi - lo for lo, hi in other)
        plan.kv_bytes_covered += sum(min(hi, addr + size) - max(lo, addr) for lo, hi in kv
                                     if lo < addr + size and addr < hi)
    return plan


class _DeviceBytes:
    """``n`` bytes of device memory at ``ptr`` as a CUDA array (``torch.as_tensor`` makes a view)."""

    def __init__(self, ptr: int, n: int):
        self.__cuda_array_interface__ = {"shape": (int(n),), "typestr": "|u1", "data": (int(ptr), False),
                                         "version": 3, "strides": None}


def device_view(ptr: int, n: int):
    """A ``uint8`` CUDA tensor viewing ``n`` bytes at address ``ptr`` (no copy, no ownership)."""
    import torch

    return torch.as_tensor(_DeviceBytes(ptr, n), device="cuda")


def cumem_release_available() -> bool:
    """Whether the installed vLLM exposes what :class:`CuMemKvRelease` uses (a feature probe)."""
    try:
        from vllm.device_allocator import cumem
    except Exception:  # noqa: BLE001 - any import failure means: not available
        return False
    alloc = getattr(cumem, "CuMemAllocator", None)
    return (alloc is not None and hasattr(alloc, "get_instance") and callable(getattr(cumem, "unmap_and_release", None))
            and callable(getattr(cumem, "create_and_map", None)) and bool(getattr(cumem, "cumem_available", False)))


def kv_storage_ranges(runner) -> list[tuple[int, int]]:
    """[start, end) of the storage behind each of the model runner's KV-cache tensors."""
    out = []
    for t in getattr(runner, "kv_caches", None) or []:
        for x in (t if isinstance(t, (list, tuple)) else [t]):
            if x is None:
                continue
            s = x.untyped_storage()
            out.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    return out


class CuMemKvRelease:
    """Release and restore the KV cache of an in-process ``vllm.LLM`` built with sleep mode, keeping
    the engine metadata that shares its allocations (copied to host memory and back).

    Plans once at construction (after the engine has allocated its KV cache and captured its
    graphs; nothing allocates into the ``kv_cache`` pool afterwards). Raises RuntimeError when
    nothing can be released."""

    def __init__(self, runner: Any):
        import torch
        from vllm.device_allocator import cumem

        self._cumem = cumem
        self._runner = runner
        self._allocator = cumem.CuMemAllocator.get_instance()
        torch.cuda.synchronize()
        data = self._allocator.pointer_to_data
        allocations = [(int(ptr), int(d.handle[1]), d.tag) for ptr, d in data.items()]
        self.plan = plan_release(allocations, torch.cuda.memory_snapshot(), kv_storage_ranges(runner))
        if not self.plan.release:
            reasons = "; ".join(sorted(set(self.plan.kept.values()))) or "no kv_cache allocation found"
            raise RuntimeError(f"no KV-cache allocation of this vLLM can be released on its own ({reasons})")
        if self.plan.kept:
            log.warning("KV-only release keeps %d kv_cache allocation(s) mapped: %s", len(self.plan.kept),
                        "; ".join(sorted(set(self.plan.kept.values()))))
        if self.plan.kv_bytes_covered < self.plan.kv_bytes:
            log.warning("KV-only release frees %.2f of the KV cache's %.2f GiB", self.plan.kv_bytes_covered / 2**30,
                        self.plan.kv_bytes / 2**30)
        self._data = [data[ptr] for ptr in self.plan.release]
        self._allocations = allocations
        self._saved: list[tuple[int, Any]] = []
        self.released = False

    @property
    def nbytes(self) -> int:
        """Physical bytes a :meth:`release` gives back."""
        return self.plan.release_bytes

    def release(self) -> None:
        """Unmap and release the planned allocations (idempotent)."""
        if self.released:
            return
        import torch

        torch.cuda.synchronize()
        # what else lives in the released allocations now (re-read: temporaries may have come and gone)
        plan = plan_release(self._allocations, torch.cuda.memory_snapshot(), kv_storage_ranges(self._runner))
        if sorted(plan.release) != sorted(self.plan.release):
            raise RuntimeError("the kv_cache pool's layout changed since the engine started; refusing to release it")
        self._saved = []
        for lo, hi in plan.preserve:
            host = torch.empty(hi - lo, dtype=torch.uint8, pin_memory=True)
            host.copy_(device_view(lo, hi - lo))
            self._saved.append((lo, host))
        torch.cuda.synchronize()
        for d in self._data:
            self._cumem.unmap_and_release(d.handle)
            d.is_asleep = True
        self.released = True

    def restore(self) -> None:
        """Map fresh memory at the same addresses, zero the KV cache, copy the preserved engine
        metadata back, let the runner re-initialize what it keeps about it (idempotent)."""
        if not self.released:
            return
        for d in self._data:
            self._cumem.create_and_map(d.handle)
            d.is_asleep = False
        self.released = False
        for t in getattr(self._runner, "kv_caches", None) or []:
            for x in (t if isinstance(t, (list, tuple)) else [t]):
                if x is not None:
                    x.zero_()
        for lo, host in self._saved:  # engine metadata, bit for bit, at its own address
            device_view(lo, host.numel()).copy_(host)
        import torch

        torch.cuda.synchronize()
        self._saved = []
        post = getattr(self._runner, "post_kv_cache_wake_up", None)
        if callable(post):
            post()

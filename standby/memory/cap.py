"""A device-memory cap: make this process see an N GiB card on a larger one.

``DeviceMemoryCap(80)`` on a 141 GB H200 maps ``total - 80 GiB`` of physical memory into one plain
allocation (a :class:`~compilepass.standby.memory.region.KVRegion` that stays awake, outside
torch's caching allocator) and holds it until :meth:`close`. Everything that asks the driver how
much memory is free -- ``torch.cuda.mem_get_info``, the KV planner, vLLM's
``gpu_memory_utilization`` -- and torch's allocator, whose ``cudaMalloc`` now fails where an
80 GiB card's would, sees an 80 GiB card. :func:`~compilepass.standby.memory.free_device_memory`
reports the capped total; ``torch.cuda.mem_get_info`` still reports the physical total (its free
value is the capped one). Take the cap before anything is loaded: memory already in use counts
against the N GiB.

Results record :meth:`DeviceMemoryCap.describe` (the cap, the bytes held, the physical total).
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch

from compilepass.standby.memory.errors import StandbyError, StandbyMemoryError, fmt_bytes
from compilepass.standby.memory.region import _CAPPED_TOTAL, KVRegion, _resolve_device

log = logging.getLogger(__name__)

GiB = 1 << 30


class DeviceMemoryCap:
    """``DeviceMemoryCap(gib, device=None)``: this process sees a ``gib`` GiB card until ``close()``
    (also a context manager). ``gib`` at or above the physical total caps nothing (logged)."""

    def __init__(self, gib: float, device: Union[None, int, str, torch.device] = None):
        try:
            gib = float(gib)
        except (TypeError, ValueError):
            raise StandbyError(f"the device-memory cap must be a number of GiB, got {gib!r}") from None
        if not gib > 0:
            raise StandbyError(f"the device-memory cap must be > 0 GiB, got {gib:g}")
        if not torch.cuda.is_available():
            raise StandbyError("a device-memory cap needs a CUDA device, and CUDA is not available here")
        self.device = _resolve_device(device if device is not None else "cuda")
        if self.device.type != "cuda":
            raise StandbyError(f"a device-memory cap applies to a CUDA device, not {self.device}")
        self.gib = gib
        self.region: Optional[KVRegion] = None
        self.held_bytes = 0
        free, total = torch.cuda.mem_get_info(self.device)
        self.physical_total = int(total)
        target = int(gib * GiB)
        hold = self.physical_total - target
        if hold <= 0:
            log.info("device-memory cap %.2f GiB >= the card's %.2f GiB: nothing capped", gib, total / GiB)
            self.held_bytes = 0
            return
        if hold > free:
            raise StandbyMemoryError(
                f"cannot cap {self.device} at {gib:g} GiB: that needs {fmt_bytes(hold)} of the "
                f"{fmt_bytes(total)} card held, but only {fmt_bytes(free)} is free (take the cap before "
                f"loading anything)", needed=hold, free=free)
        self.region = KVRegion(hold, device=self.device)
        self.held_bytes = self.region.nbytes
        _CAPPED_TOTAL[self.device.index] = self.physical_total - self.held_bytes
        log.info("device-memory cap: %s now shows %.2f GiB (holding %.2f GiB of %.2f GiB)", self.device,
                 self.visible_total / GiB, self.held_bytes / GiB, total / GiB)

    @property
    def visible_total(self) -> int:
        """The card's size as this process sees it, in bytes."""
        return self.physical_total - self.held_bytes

    def describe(self) -> dict:
        """What a benchmark result records about the cap."""
        return {"device_memory_cap_gib": self.gib, "visible_total_gib": round(self.visible_total / GiB, 3),
                "held_gib": round(self.held_bytes / GiB, 3), "physical_total_gib": round(self.physical_total / GiB, 3)}

    def close(self) -> None:
        """Give the held memory back (idempotent)."""
        if self.region is not None:
            _CAPPED_TOTAL.pop(self.device.index, None)
            self.region.close()
            self.region = None
            self.held_bytes = 0

    def __del__(self) -> None:  # a cap dropped without close() (e.g. a constructor that raised after it)
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass

    def __enter__(self) -> "DeviceMemoryCap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeviceMemoryCap({self.gib:g} GiB on {self.device}, holding {self.held_bytes / GiB:.2f} GiB)"

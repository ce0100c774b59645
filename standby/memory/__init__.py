"""Standby memory: the address-stable KV region whose physical memory sleeps while training runs.

- :mod:`~compilepass.standby.memory.region`: :class:`KVRegion` (sleep / wake / carve);
- :mod:`~compilepass.standby.memory.layout`: tensor specs and aligned layouts;
- :mod:`~compilepass.standby.memory.driver`: the CUDA driver's virtual-memory calls;
- :mod:`~compilepass.standby.memory.cap`: :class:`DeviceMemoryCap`, an N GiB card on a larger one;
- :mod:`~compilepass.standby.memory.errors`: what goes wrong, one line each.
"""

from compilepass.standby.memory.cap import DeviceMemoryCap
from compilepass.standby.memory.errors import (CudaDriverError, RegionClosedError, RegionLayoutError, StandbyError,
                                               StandbyMemoryError)
from compilepass.standby.memory.layout import CPU_GRANULARITY, DEFAULT_ALIGN, TensorSpec, plan_layout, required_bytes
from compilepass.standby.memory.region import KVRegion, free_device_memory

__all__ = [
    "KVRegion",
    "DeviceMemoryCap",
    "TensorSpec",
    "StandbyError",
    "StandbyMemoryError",
    "CudaDriverError",
    "RegionLayoutError",
    "RegionClosedError",
    "free_device_memory",
    "plan_layout",
    "required_bytes",
    "CPU_GRANULARITY",
    "DEFAULT_ALIGN",
]

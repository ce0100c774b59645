"""The address-stable KV region: device memory whose physical pages come and go, addresses stay.

RL alternates generation (weights + KV cache) and training (weights + activations, gradients,
optimizer state). :class:`KVRegion` holds the KV cache in a range of virtual addresses reserved
once with the CUDA driver's virtual-memory API. ``sleep()`` unmaps and releases the physical
memory behind the range, so the trainer can allocate it; ``wake()`` creates fresh physical memory
and maps it at the *same* addresses. Tensors viewed over the region, and CUDA graphs captured over
those tensors, stay valid across the cycle because no address ever moves. Contents are NOT kept:
after ``wake()`` the region holds whatever the new physical pages held (rewrite the KV cache, or
pass ``wake(zero=True)``).

Driver calls (``cuda.bindings.driver``, the ``cuda-bindings`` package)::

    create : cuInit, cuDeviceGet, cuDevicePrimaryCtxRetain (the context torch uses),
             cuMemGetAllocationGranularity, cuMemAddressReserve, then wake()
    wake   : torch.cuda.empty_cache(), cuMemGetInfo (enough free?), per chunk:
             cuMemCreate(PINNED, this device) + cuMemMap + cuMemSetAccess(read/write)
    sleep  : torch.cuda.synchronize(), per chunk: cuMemUnmap + cuMemRelease
    close  : sleep, cuMemAddressFree, cuDevicePrimaryCtxRelease

Every call's ``CUresult`` is checked; a failure raises :class:`CudaDriverError` naming the call,
an out-of-memory one :class:`StandbyMemoryError` with the bytes needed and free.

Physical memory is one handle per chunk. By default one chunk covers the whole region (one
``cuMemCreate``); ``chunk_bytes`` splits it into granule-aligned chunks. If a chunk cannot be
created or mapped, the chunks already mapped by that ``wake()`` are unmapped and released again,
so a failed ``wake()`` leaves the region cleanly asleep.

Without CUDA (or with ``device="cpu"``) the same API works over one ordinary CPU buffer: nothing
is released, ``sleep()``/``wake()`` only flip the state, views keep their addresses. Everything
built on the region therefore runs and is tested on CPU.

Safety rules (the hardware enforces none of them):

- Do not touch region tensors while the region is asleep: on CUDA that is an illegal memory
  access, which poisons the whole CUDA context. ``tensor()``/``carve()`` may be called while
  asleep (they only compute addresses); reading or writing may not.
- ``close()`` frees the addresses at once; views and graphs over the region must not be used
  afterwards. A region that is merely dropped is freed only when the last view is gone too
  (views keep the memory alive).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from compilepass.standby.memory.driver import CudaArray, _DriverVMM, load_driver
from compilepass.standby.memory.errors import (RegionClosedError, RegionLayoutError, StandbyError, StandbyMemoryError,
                                               fmt_bytes)
from compilepass.standby.memory.layout import (CPU_GRANULARITY, DEFAULT_ALIGN, SpecsLike, check_shape, check_size,
                                               itemsize, normalize_specs, plan_layout, round_up)

#: Device index -> the total this process is capped to (set by a live
#: :class:`~compilepass.standby.memory.cap.DeviceMemoryCap`, removed when it closes).
_CAPPED_TOTAL: Dict[int, int] = {}


def free_device_memory(device: Union[None, int, str, torch.device] = None) -> Tuple[int, int]:
    """``(free, total)`` bytes of device memory (``cudaMemGetInfo``) of ``device``; under a
    :class:`~compilepass.standby.memory.cap.DeviceMemoryCap` the total is the capped one (free is
    what the driver reports, the cap's own allocation already taken out).

    Without CUDA (or for a CPU device) it returns the host's available and total memory.
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return int(free), int(_CAPPED_TOTAL.get(dev.index, total))
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info.get("MemFree", 0)), info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def _resolve_device(device: Union[None, int, str, torch.device]) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        device = torch.device("cuda", device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RegionLayoutError(f"bad device {device!r}: {exc}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise RegionLayoutError(f"KVRegion supports cuda and cpu devices, got {dev}")
    if not torch.cuda.is_available():
        raise StandbyError(
            f"KVRegion on {dev} needs CUDA, which is not available here "
            "(use device='cpu' or device=None for the CPU fallback)"
        )
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise StandbyError(f"no device {dev}: this process sees {torch.cuda.device_count()} GPU(s)")
    return dev


class KVRegion:
    """``nbytes`` of memory at fixed addresses whose physical backing can be released and restored.

    ``KVRegion(nbytes, device=None)``: ``device`` is a CUDA device (the current one when None
    and CUDA is available) or ``"cpu"`` for the CPU fallback. ``nbytes`` is rounded up to the
    allocation granularity. The region starts awake (``awake=False`` reserves only).

    ``chunk_bytes`` splits the physical memory into handles of that size (rounded up to the
    granularity); None (default) uses one handle. ``granularity`` is ``"recommended"``
    (default) or ``"minimum"``, as reported by ``cuMemGetAllocationGranularity``.
    """

    def __init__(
        self,
        nbytes: int,
        device: Union[None, int, str, torch.device] = None,
        *,
        chunk_bytes: Optional[int] = None,
        granularity: str = "recommended",
        awake: bool = True,
    ):
        requested = check_size(nbytes)
        self._device = _resolve_device(device)
        self._lock = threading.RLock()
        self._closed = False
        self._vmm: Optional[_DriverVMM] = None
        if self._device.type == "cuda":
            self._init_cuda(requested, chunk_bytes, granularity, awake)
        else:
            self._init_cpu(requested, chunk_bytes, granularity, awake)

    # construction
    def _init_cuda(self, requested: int, chunk_bytes, granularity: str, awake: bool) -> None:
        torch.cuda.init()
        dev = self._device
        driver = load_driver()
        vmm = _DriverVMM(
            driver,
            dev.index,
            requested,
            chunk_bytes=chunk_bytes,
            granularity=granularity,
            before_map=lambda: torch.cuda.empty_cache(),
            synchronize=lambda: torch.cuda.synchronize(dev),
        )
        self._vmm = vmm
        self._granularity = vmm.granularity
        self._nbytes = vmm.nbytes
        self._base_address = vmm.base_address
        self._chunk_bytes = vmm.chunk_bytes
        try:
            with torch.cuda.device(dev):
                base = torch.as_tensor(CudaArray(vmm.base_address, vmm.nbytes, vmm), device=dev)
        except (RuntimeError, TypeError, ValueError) as exc:
            vmm.free()
            raise StandbyError(
                f"torch could not wrap the region zero-copy through __cuda_array_interface__: {exc} "
                "(torch needs numpy installed for that)"
            ) from exc
        if base.data_ptr() != vmm.base_address or base.numel() != vmm.nbytes:
            raise StandbyError(
                f"torch wrapped the region at {base.data_ptr():#x} ({base.numel()} bytes), expected "
                f"{vmm.base_address:#x} ({vmm.nbytes} bytes): it copied instead of viewing"
            )
        self._base = base
        self._awake = False
        if awake:
            self.wake()

    def _init_cpu(self, requested: int, chunk_bytes, granularity: str, awake: bool) -> None:
        if granularity not in ("recommended", "minimum"):
            raise RegionLayoutError(f"granularity must be 'recommended' or 'minimum', got {granularity!r}")
        self._granularity = CPU_GRANULARITY
        self._nbytes = round_up(requested, CPU_GRANULARITY)
        self._chunk_bytes = (
            self._nbytes
            if chunk_bytes is None
            else min(round_up(check_size(chunk_bytes, "chunk_bytes"), CPU_GRANULARITY), self._nbytes)
        )
        page = 4096
        try:
            raw = torch.empty(self._nbytes + page, dtype=torch.uint8)
        except RuntimeError as exc:
            raise StandbyMemoryError(
                f"cannot allocate a CPU KV region of {fmt_bytes(self._nbytes)}: {exc}",
                needed=self._nbytes,
                free=free_device_memory("cpu")[0],
            ) from exc
        pad = (-raw.data_ptr()) % page
        self._base = raw[pad : pad + self._nbytes]
        self._base_address = self._base.data_ptr()
        self._awake = bool(awake)

    # properties
    @property
    def nbytes(self) -> int:
        """Size in bytes, rounded up to the granularity."""
        return self._nbytes

    @property
    def base_address(self) -> int:
        """The first byte's virtual address; never changes during the region's life."""
        return self._base_address

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def granularity(self) -> int:
        return self._granularity

    @property
    def chunk_bytes(self) -> int:
        """Bytes per physical handle (the last chunk may be smaller)."""
        return self._chunk_bytes

    @property
    def is_awake(self) -> bool:
        return self._awake

    @property
    def is_closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("awake" if self._awake else "asleep")
        return (
            f"KVRegion({self._nbytes} bytes on {self._device} at {self._base_address:#x}, {state})"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RegionClosedError("the KV region was closed")

    # views
    def tensor(
        self, dtype: torch.dtype, shape: Union[int, Sequence[int]], offset_bytes: int = 0
    ) -> torch.Tensor:
        """A contiguous ``dtype`` tensor of ``shape`` starting ``offset_bytes`` into the region.

        Zero-copy: ``result.data_ptr() == base_address + offset_bytes``. All views share the
        region's one buffer. May be called while asleep (it does not touch memory).
        """
        self._check_open()
        size = itemsize(dtype)
        dims = check_shape(shape)
        if isinstance(offset_bytes, bool) or not isinstance(offset_bytes, int) or offset_bytes < 0:
            raise RegionLayoutError(f"offset_bytes must be a non-negative int, got {offset_bytes!r}")
        if offset_bytes % size:
            raise RegionLayoutError(
                f"offset_bytes={offset_bytes} is not a multiple of {dtype}'s itemsize {size}"
            )
        nbytes = math.prod(dims) * size
        if offset_bytes + nbytes > self._nbytes:
            raise RegionLayoutError(
                f"a {dtype} tensor of shape {dims} ({nbytes} bytes) at offset {offset_bytes} "
                f"ends at {offset_bytes + nbytes}, past the region's {self._nbytes} bytes"
            )
        view = self._base[offset_bytes : offset_bytes + nbytes].view(dtype).view(dims)
        expected = self._base_address + offset_bytes
        if nbytes and view.data_ptr() != expected:  # pragma: no cover - a torch contract
            raise StandbyError(f"view at {view.data_ptr():#x}, expected {expected:#x}")
        return view

    def as_bytes(self) -> torch.Tensor:
        """The whole region as one uint8 tensor."""
        return self.tensor(torch.uint8, (self._nbytes,))

    def carve(
        self, specs: SpecsLike, *, align: int = DEFAULT_ALIGN, offset_bytes: int = 0
    ) -> Dict[str, torch.Tensor]:
        """Lay ``specs`` out one after another (each start a multiple of ``align``), return views.

        ``specs``: ``{name: (dtype, shape)}``, or an iterable of ``TensorSpec`` /
        ``(name, dtype, shape)``; order is kept. Example, per-layer K and V::

            kv = region.carve({f"{kind}{i}": (torch.bfloat16, (B, H, L, D))
                               for i in range(layers) for kind in "kv"})
        """
        self._check_open()
        items = normalize_specs(specs)  # once: specs may be a one-shot iterator
        offsets, end = plan_layout(items, align, offset_bytes)
        if end > self._nbytes:
            raise RegionLayoutError(
                f"the layout needs {end} bytes (align={align}, starting at {offset_bytes}) but the "
                f"region has {self._nbytes}; create it with KVRegion(required_bytes(specs, align))"
            )
        return {spec.name: self.tensor(spec.dtype, spec.shape, offsets[spec.name]) for spec in items}

    # sleep / wake
    def sleep(self) -> None:
        """Release all physical memory (waits for the device first). Idempotent.

        The addresses stay reserved; views and graphs stay valid but must not run until wake().
        """
        with self._lock:
            self._check_open()
            if not self._awake:
                return
            if self._vmm is not None:
                self._vmm.unmap()
            self._awake = False

    def wake(self, *, zero: bool = False) -> None:
        """Map fresh physical memory at the same addresses. Idempotent; contents are not kept.

        Empties torch's cache first, so its free blocks go back to the driver, then raises
        :class:`StandbyMemoryError` if the device still has fewer than ``nbytes`` free.
        ``zero=True`` fills the region with zeros after mapping.
        """
        with self._lock:
            self._check_open()
            if self._awake:
                return
            if self._vmm is not None:
                self._vmm.map()
            self._awake = True
            if zero:
                self._base.zero_()

    # lifetime
    def close(self) -> None:
        """Free the physical memory and the addresses now. Idempotent.

        Views and CUDA graphs over the region must not be used afterwards.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._awake = False
            self._base = None  # views keep their own reference to the buffer
            if self._vmm is not None:
                vmm, self._vmm = self._vmm, None
                vmm.free()

    def __enter__(self) -> "KVRegion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Deliberately nothing: the mapping is owned by _DriverVMM, whose __del__ frees it once
        # no view references it either, so dropping the region while views (or graphs built on
        # them) live stays safe. close() is the way to free it at a chosen moment.
        pass

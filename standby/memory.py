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

import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from compilepass.errors import CompilepassError

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20

#: Granule used by the CPU fallback, chosen equal to the usual CUDA granularity (2 MiB) so that
#: rounded sizes and carve() layouts are the same on CPU and GPU.
CPU_GRANULARITY = 2 * MiB
#: Default alignment of each tensor laid out by :meth:`KVRegion.carve`.
DEFAULT_ALIGN = 256

__all__ = [
    "KVRegion",
    "TensorSpec",
    "StandbyError",
    "StandbyMemoryError",
    "CudaDriverError",
    "RegionLayoutError",
    "RegionClosedError",
    "free_device_memory",
    "plan_layout",
    "required_bytes",
]


# --------------------------------------------------------------------------------------- errors


class StandbyError(CompilepassError):
    """Base class of the standby memory errors."""


class StandbyMemoryError(StandbyError):
    """Not enough device memory to (re)map the region."""

    def __init__(self, message: str, *, needed: int, free: Optional[int] = None):
        super().__init__(message)
        self.needed = needed
        self.free = free


class CudaDriverError(StandbyError):
    """A CUDA driver call returned an error."""

    def __init__(self, call: str, code: int, name: str, description: str):
        super().__init__(f"{call} failed: {name} ({code}): {description}")
        self.call = call
        self.code = code
        self.name = name


class RegionLayoutError(StandbyError, ValueError):
    """A bad size, offset, dtype or shape for a region or a view over it."""


class RegionClosedError(StandbyError):
    """The region was closed."""


def _fmt_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB ({n} bytes)"


# ------------------------------------------------------------------------------------ helpers


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_size(nbytes: Any, what: str = "nbytes") -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        try:
            import numpy as np  # numpy integers are fine

            if isinstance(nbytes, np.integer):
                nbytes = int(nbytes)
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise RegionLayoutError(
                f"{what} must be an int number of bytes, got {type(nbytes).__name__} {nbytes!r}"
            ) from None
    if nbytes <= 0:
        raise RegionLayoutError(f"{what} must be positive, got {nbytes}")
    return nbytes


def _itemsize(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise RegionLayoutError(f"dtype must be a torch.dtype, got {dtype!r}")
    size = getattr(dtype, "itemsize", None)  # torch >= 2.1
    return size if size is not None else torch.empty((), dtype=dtype).element_size()


def _check_shape(shape: Any) -> Tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise RegionLayoutError(f"shape must be a sequence of ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise RegionLayoutError(f"shape must hold non-negative ints, got {shape!r}")
    return dims


def free_device_memory(device: Union[None, int, str, torch.device] = None) -> Tuple[int, int]:
    """``(free, total)`` bytes of device memory (``cudaMemGetInfo``) of ``device``.

    Without CUDA (or for a CPU device) it returns the host's available and total memory.
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return int(free), int(total)
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


# ------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a :meth:`KVRegion.carve` layout."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


SpecsLike = Union[
    Mapping[str, Tuple[torch.dtype, Sequence[int]]],
    Iterable[Union[TensorSpec, Tuple[str, torch.dtype, Sequence[int]]]],
]


def _normalize_specs(specs: SpecsLike) -> List[TensorSpec]:
    items: List[TensorSpec] = []
    if isinstance(specs, Mapping):
        raw = [(name, *value) for name, value in specs.items()]
    else:
        raw = list(specs)
    for item in raw:
        if isinstance(item, TensorSpec):
            spec = item
        else:
            try:
                name, dtype, shape = item
            except (TypeError, ValueError):
                raise RegionLayoutError(
                    f"a spec must be TensorSpec or (name, dtype, shape), got {item!r}"
                ) from None
            spec = TensorSpec(str(name), dtype, _check_shape(shape))
        _itemsize(spec.dtype)
        items.append(TensorSpec(spec.name, spec.dtype, _check_shape(spec.shape)))
    names = [s.name for s in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RegionLayoutError(f"duplicate tensor names in specs: {dupes}")
    return items


def _check_align(align: Any) -> int:
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise RegionLayoutError(f"align must be a positive power of two, got {align!r}")
    return align


def plan_layout(
    specs: SpecsLike, align: int = DEFAULT_ALIGN, offset_bytes: int = 0
) -> Tuple[Dict[str, int], int]:
    """Offsets (bytes from the region's start) for ``specs`` laid out in order, and the end.

    Each tensor starts at a multiple of ``align`` (a power of two, at least every itemsize).
    """
    align = _check_align(align)
    items = _normalize_specs(specs)
    if isinstance(offset_bytes, bool) or not isinstance(offset_bytes, int) or offset_bytes < 0:
        raise RegionLayoutError(f"offset_bytes must be a non-negative int, got {offset_bytes!r}")
    offsets: Dict[str, int] = {}
    cursor = offset_bytes
    for spec in items:
        size = _itemsize(spec.dtype)
        if align % size:
            raise RegionLayoutError(f"align={align} is not a multiple of {spec.dtype}'s itemsize {size}")
        cursor = _round_up(cursor, align)
        offsets[spec.name] = cursor
        cursor += spec.nbytes
    return offsets, cursor


def required_bytes(specs: SpecsLike, align: int = DEFAULT_ALIGN) -> int:
    """Bytes a region needs (before rounding to the granularity) to :meth:`~KVRegion.carve` specs."""
    return plan_layout(specs, align)[1]


# ----------------------------------------------------------------------------- CUDA backend


def load_driver():
    """The ``cuda.bindings.driver`` module (``cuda-bindings`` >= 12.6; older: ``cuda.cuda``)."""
    try:
        from cuda.bindings import driver

        return driver
    except ImportError:
        pass
    try:
        from cuda import cuda as driver  # cuda-python < 12.6

        return driver
    except ImportError:
        raise StandbyError(
            "KVRegion on CUDA needs the CUDA driver bindings: pip install cuda-bindings "
            "(or pip install 'compilepass[cuda]')"
        ) from None


class _DriverVMM:
    """A reserved virtual address range plus the physical chunks mapped into it.

    Knows nothing about torch except through the two hooks: ``before_map`` (called before the
    free-memory check, e.g. ``torch.cuda.empty_cache``) and ``synchronize`` (before unmapping).
    ``driver`` is the ``cuda.bindings.driver`` module or a stand-in with the same names.
    """

    def __init__(
        self,
        driver,
        ordinal: int,
        nbytes: int,
        *,
        chunk_bytes: Optional[int] = None,
        granularity: str = "recommended",
        before_map: Callable[[], None] = lambda: None,
        synchronize: Callable[[], None] = lambda: None,
    ):
        self._d = driver
        self.ordinal = ordinal
        self._before_map = before_map
        self._synchronize = synchronize
        self._handles: List[Tuple[int, int, Any]] = []  # (offset, size, handle) mapped now
        self._reserved = False
        self._ctx = None
        self._dev = None
        self.base_address = 0

        d = driver
        self._check("cuInit", d.cuInit(0))
        self._dev = self._check("cuDeviceGet", d.cuDeviceGet(ordinal))
        try:
            attr = d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
            supported = self._check("cuDeviceGetAttribute", d.cuDeviceGetAttribute(attr, self._dev))
        except AttributeError:  # a stand-in driver without the attribute query
            supported = 1
        if not supported:
            raise StandbyError(
                f"device {ordinal} does not support CUDA virtual memory management "
                "(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is 0)"
            )
        self._ctx = self._check("cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain(self._dev))

        self._prop = d.CUmemAllocationProp()
        self._prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = ordinal
        self._access = d.CUmemAccessDesc()
        self._access.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = ordinal
        self._access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE

        if granularity not in ("recommended", "minimum"):
            raise RegionLayoutError(f"granularity must be 'recommended' or 'minimum', got {granularity!r}")
        flag = (
            d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
            if granularity == "recommended"
            else d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        )
        with self._context():
            gran = int(self._check("cuMemGetAllocationGranularity", d.cuMemGetAllocationGranularity(self._prop, flag)))
            # cuMemMap needs sizes and offsets in multiples of the *minimum* granularity; the
            # recommended one is a multiple of it, so rounding to either is valid.
            self.granularity = gran
            self.nbytes = _round_up(nbytes, gran)
            if chunk_bytes is None:
                self.chunk_bytes = self.nbytes
            else:
                self.chunk_bytes = min(_round_up(_check_size(chunk_bytes, "chunk_bytes"), gran), self.nbytes)
            ptr = self._check("cuMemAddressReserve", d.cuMemAddressReserve(self.nbytes, gran, 0, 0))
            self._reserved = True
            self.base_address = int(ptr)

    # driver plumbing
    def _check(self, call: str, result):
        if isinstance(result, tuple):
            err, rest = result[0], result[1:]
        else:
            err, rest = result, ()
        if err != self._d.CUresult.CUDA_SUCCESS:
            code = int(err)
            try:
                _, name = self._d.cuGetErrorName(err)
                _, desc = self._d.cuGetErrorString(err)
                name = name.decode() if isinstance(name, bytes) else str(name)
                desc = desc.decode() if isinstance(desc, bytes) else str(desc)
            except Exception:  # the error lookup itself failed; keep the code
                name, desc = getattr(err, "name", "CUDA_ERROR"), "no description"
            raise CudaDriverError(call, code, name, desc)
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    def _is_oom(self, exc: CudaDriverError) -> bool:
        return exc.code == int(self._d.CUresult.CUDA_ERROR_OUT_OF_MEMORY)

    class _Ctx:
        def __init__(self, vmm: "_DriverVMM"):
            self.vmm = vmm

        def __enter__(self):
            self.vmm._check("cuCtxPushCurrent", self.vmm._d.cuCtxPushCurrent(self.vmm._ctx))

        def __exit__(self, *exc):
            self.vmm._check("cuCtxPopCurrent", self.vmm._d.cuCtxPopCurrent())

    def _context(self) -> "_DriverVMM._Ctx":
        """Make the primary context current for the driver calls, whatever thread we are on."""
        return _DriverVMM._Ctx(self)

    def _ptr(self, offset: int):
        return self._d.CUdeviceptr(self.base_address + offset)

    # state
    @property
    def mapped(self) -> bool:
        return bool(self._handles)

    def mem_info(self) -> Tuple[int, int]:
        with self._context():
            free, total = self._check("cuMemGetInfo", self._d.cuMemGetInfo())
        return int(free), int(total)

    def map(self) -> None:
        """Create and map physical memory over the whole range; on failure map nothing."""
        if self._handles:
            return
        if not self._reserved:
            raise RegionClosedError("the KV region was closed")
        self._before_map()
        free, _total = self.mem_info()
        if free < self.nbytes:
            raise StandbyMemoryError(
                f"KV region wake needs {_fmt_bytes(self.nbytes)} of device memory on cuda:{self.ordinal} "
                f"but only {_fmt_bytes(free)} is free after emptying torch's cache; release "
                f"{_fmt_bytes(self.nbytes - free)} (e.g. training activations, gradients or "
                "optimizer state) before waking the region",
                needed=self.nbytes,
                free=free,
            )
        d = self._d
        with self._context():
            try:
                for offset in range(0, self.nbytes, self.chunk_bytes):
                    size = min(self.chunk_bytes, self.nbytes - offset)
                    handle = self._check("cuMemCreate", d.cuMemCreate(size, self._prop, 0))
                    try:
                        self._check("cuMemMap", d.cuMemMap(self._ptr(offset), size, 0, handle, 0))
                    except BaseException:
                        d.cuMemRelease(handle)
                        raise
                    self._handles.append((offset, size, handle))
                    self._check("cuMemSetAccess", d.cuMemSetAccess(self._ptr(offset), size, [self._access], 1))
            except CudaDriverError as exc:
                mapped = sum(s for _, s, _ in self._handles)
                self._unmap_all(raise_errors=False)
                if self._is_oom(exc):
                    raise StandbyMemoryError(
                        f"KV region wake: {exc.call} ran out of device memory on cuda:{self.ordinal} "
                        f"after mapping {_fmt_bytes(mapped)} of {_fmt_bytes(self.nbytes)} "
                        f"(free before: {_fmt_bytes(free)}); the partial mapping was released",
                        needed=self.nbytes,
                        free=free,
                    ) from exc
                raise

    def unmap(self) -> None:
        """Unmap and release all physical memory; the addresses stay reserved."""
        if not self._handles:
            return
        self._synchronize()
        with self._context():
            self._unmap_all(raise_errors=True)

    def _unmap_all(self, raise_errors: bool) -> None:
        first_error: Optional[CudaDriverError] = None
        while self._handles:
            offset, size, handle = self._handles.pop()
            for call, result in (
                ("cuMemUnmap", lambda: self._d.cuMemUnmap(self._ptr(offset), size)),
                ("cuMemRelease", lambda: self._d.cuMemRelease(handle)),
            ):
                try:
                    self._check(call, result())
                except CudaDriverError as exc:
                    first_error = first_error or exc
        if first_error is not None and raise_errors:
            raise first_error

    def free(self) -> None:
        """Release everything: physical memory, the address range, the context reference."""
        try:
            if self._handles:
                self.unmap()
            if self._reserved:
                with self._context():
                    self._reserved = False
                    self._check("cuMemAddressFree", self._d.cuMemAddressFree(self._ptr(0), self.nbytes))
        finally:
            if self._ctx is not None:
                ctx_dev, self._ctx = self._dev, None
                self._check("cuDevicePrimaryCtxRelease", self._d.cuDevicePrimaryCtxRelease(ctx_dev))

    def __del__(self) -> None:
        # Runs when the region *and* every view over it are gone (views reference _CudaArray,
        # which references this object). Never raises: the driver may be shutting down.
        try:
            if self._handles or self._reserved or self._ctx is not None:
                self.free()
        except Exception:  # pragma: no cover - depends on interpreter shutdown order
            pass


class _CudaArray:
    """Presents a device range through ``__cuda_array_interface__`` so torch wraps it zero-copy.

    The torch tensor keeps this object alive, and this object keeps the mapping alive.
    """

    def __init__(self, ptr: int, nbytes: int, owner: Any):
        self._owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,  # C-contiguous
            "version": 2,
        }


# ------------------------------------------------------------------------------------ region


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
        requested = _check_size(nbytes)
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
                base = torch.as_tensor(_CudaArray(vmm.base_address, vmm.nbytes, vmm), device=dev)
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
        self._nbytes = _round_up(requested, CPU_GRANULARITY)
        self._chunk_bytes = (
            self._nbytes
            if chunk_bytes is None
            else min(_round_up(_check_size(chunk_bytes, "chunk_bytes"), CPU_GRANULARITY), self._nbytes)
        )
        page = 4096
        try:
            raw = torch.empty(self._nbytes + page, dtype=torch.uint8)
        except RuntimeError as exc:
            raise StandbyMemoryError(
                f"cannot allocate a CPU KV region of {_fmt_bytes(self._nbytes)}: {exc}",
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
        size = _itemsize(dtype)
        dims = _check_shape(shape)
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
        items = _normalize_specs(specs)  # once: specs may be a one-shot iterator
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

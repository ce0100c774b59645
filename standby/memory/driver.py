"""The CUDA driver's virtual-memory calls behind a region: reserve once, map and unmap physical chunks.

Every call's ``CUresult`` is checked; a failure raises :class:`CudaDriverError` naming the call,
an out-of-memory one :class:`StandbyMemoryError` with the bytes needed and free.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Tuple

from compilepass.standby.memory.errors import (CudaDriverError, RegionClosedError, RegionLayoutError, StandbyError,
                                               StandbyMemoryError, fmt_bytes)
from compilepass.standby.memory.layout import check_size, round_up

log = logging.getLogger(__name__)


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
            self.nbytes = round_up(nbytes, gran)
            if chunk_bytes is None:
                self.chunk_bytes = self.nbytes
            else:
                self.chunk_bytes = min(round_up(check_size(chunk_bytes, "chunk_bytes"), gran), self.nbytes)
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
                f"KV region wake needs {fmt_bytes(self.nbytes)} of device memory on cuda:{self.ordinal} "
                f"but only {fmt_bytes(free)} is free after emptying torch's cache; release "
                f"{fmt_bytes(self.nbytes - free)} (e.g. training activations, gradients or "
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
                        f"after mapping {fmt_bytes(mapped)} of {fmt_bytes(self.nbytes)} "
                        f"(free before: {fmt_bytes(free)}); the partial mapping was released",
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


class CudaArray:
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

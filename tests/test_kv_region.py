"""KVRegion: the CPU fallback, the driver logic against a stand-in driver, and GPU-only checks."""

from __future__ import annotations

import enum
import gc

import pytest
import torch

from compilepass.core.errors import CompilepassError
from compilepass.standby.memory import (CPU_GRANULARITY, CudaDriverError, KVRegion, RegionClosedError,
                                        RegionLayoutError, StandbyError, StandbyMemoryError, TensorSpec,
                                        free_device_memory, plan_layout, required_bytes)
from compilepass.standby.memory.driver import _DriverVMM

MiB = 1 << 20
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the driver's virtual-memory API)")


# ------------------------------------------------------------------------------ CPU fallback


def test_cpu_round_trip_and_rounding():
    r = KVRegion(1000, device="cpu")
    assert r.device.type == "cpu"
    assert r.nbytes == CPU_GRANULARITY and r.granularity == CPU_GRANULARITY
    assert r.is_awake and not r.is_closed
    assert r.base_address % 4096 == 0
    r.sleep()
    assert not r.is_awake
    r.wake()
    assert r.is_awake
    r.close()
    assert r.is_closed and not r.is_awake
    assert KVRegion(3 * MiB, device="cpu").nbytes == 4 * MiB
    assert KVRegion(4 * MiB, device="cpu").nbytes == 4 * MiB


def test_default_device_without_cuda_is_cpu():
    if CUDA:
        pytest.skip("CUDA is available: the default device is the GPU")
    r = KVRegion(MiB)
    assert r.device.type == "cpu"


def test_sleep_wake_idempotent_and_views_survive():
    r = KVRegion(MiB, device="cpu", awake=False)
    assert not r.is_awake
    k = r.tensor(torch.float32, (16, 8), offset_bytes=0)  # allowed while asleep
    r.wake()
    r.wake()
    k.fill_(3.0)
    ptr = k.data_ptr()
    for _ in range(3):
        r.sleep()
        r.sleep()
        assert not r.is_awake
        r.wake()
        assert r.is_awake
    assert k.data_ptr() == ptr == r.base_address
    assert r.tensor(torch.float32, (16, 8)).data_ptr() == ptr
    k.fill_(1.0)  # the same object is still usable after the cycles
    assert r.tensor(torch.float32, (16, 8)).sum().item() == 128.0


def test_wake_zero_fills():
    r = KVRegion(MiB, device="cpu")
    r.as_bytes().fill_(7)
    r.sleep()
    r.wake(zero=True)
    assert int(r.as_bytes().max()) == 0


def test_views_share_one_buffer():
    r = KVRegion(MiB, device="cpu")
    r.as_bytes().zero_()
    a = r.tensor(torch.float32, (4,), offset_bytes=1024)
    b = r.tensor(torch.int32, (2, 2), offset_bytes=1024)  # aliases a
    whole = r.as_bytes()
    a[1] = 1.0
    assert b.view(-1)[1].item() == torch.tensor(1.0).view(torch.int32).item()
    assert int(whole[1024 + 4 : 1024 + 8].view(torch.float32).item()) == 1
    assert int(whole.count_nonzero()) == 2  # the bytes of 1.0f: 0x3f800000
    assert a.data_ptr() == r.base_address + 1024
    assert a.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


def test_tensor_zero_copy_offsets_dtypes():
    r = KVRegion(MiB, device="cpu")
    for dtype, off in [(torch.bfloat16, 2), (torch.float16, 6), (torch.float32, 12), (torch.int64, 8 * 7), (torch.uint8, 3)]:
        t = r.tensor(dtype, (3, 5), offset_bytes=off)
        assert t.dtype == dtype and t.shape == (3, 5) and t.is_contiguous()
        assert t.data_ptr() == r.base_address + off
    s = r.tensor(torch.float32, ())
    assert s.shape == () and s.data_ptr() == r.base_address
    e = r.tensor(torch.float32, (0, 4), offset_bytes=r.nbytes)  # empty at the end is fine
    assert e.numel() == 0
    full = r.tensor(torch.float32, (r.nbytes // 4,))
    assert full.numel() * 4 == r.nbytes


def test_carve_layout_alignment():
    r = KVRegion(4 * MiB, device="cpu")
    specs = {f"{kind}{i}": (torch.bfloat16, (2, 3, 5, 7)) for i in range(3) for kind in "kv"}
    specs["scale"] = (torch.float32, (3,))
    kv = r.carve(specs, align=256)
    assert list(kv) == list(specs)
    offsets = [t.data_ptr() - r.base_address for t in kv.values()]
    assert offsets[0] == 0
    assert all(o % 256 == 0 for o in offsets)
    assert offsets == sorted(offsets)
    # no overlap: each tensor ends at or before the next one starts
    ends = [o + t.numel() * t.element_size() for o, t in zip(offsets, kv.values())]
    assert all(e <= nxt for e, nxt in zip(ends, offsets[1:]))
    assert kv["k0"].shape == (2, 3, 5, 7) and kv["k0"].dtype == torch.bfloat16
    # planned layout agrees, and the list / TensorSpec forms are equivalent
    plan, end = plan_layout(specs, 256)
    assert [plan[n] for n in specs] == offsets and end == ends[-1]
    as_list = [TensorSpec(n, d, s) for n, (d, s) in specs.items()]
    assert [t.data_ptr() for t in r.carve(as_list).values()] == [t.data_ptr() for t in kv.values()]
    as_gen = ((n, d, s) for n, (d, s) in specs.items())  # a one-shot iterator works too
    assert [t.data_ptr() for t in r.carve(as_gen).values()] == [t.data_ptr() for t in kv.values()]
    as_tuples = [(n, d, s) for n, (d, s) in specs.items()]
    assert required_bytes(as_tuples, 256) == end
    # an offset start and a larger alignment
    kv2 = r.carve(specs, align=4096, offset_bytes=100)
    assert all((t.data_ptr() - r.base_address) % 4096 == 0 for t in kv2.values())
    assert kv2["k0"].data_ptr() - r.base_address == 4096


def test_carve_writes_land_in_region():
    r = KVRegion(MiB, device="cpu")
    r.as_bytes().zero_()
    kv = r.carve([("k", torch.float32, (4, 4)), ("v", torch.float32, (4, 4))], align=128)
    kv["v"].fill_(2.0)
    assert r.tensor(torch.float32, (16,), offset_bytes=128).sum().item() == 32.0
    assert kv["k"].sum().item() == 0.0


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10", True, None])
def test_bad_sizes_rejected(bad):
    with pytest.raises(RegionLayoutError, match="nbytes"):
        KVRegion(bad, device="cpu")


def test_bad_views_rejected():
    r = KVRegion(MiB, device="cpu")
    with pytest.raises(RegionLayoutError, match="past the region"):
        r.tensor(torch.float32, (r.nbytes // 4 + 1,))
    with pytest.raises(RegionLayoutError, match="past the region"):
        r.tensor(torch.float32, (2,), offset_bytes=r.nbytes - 4)
    with pytest.raises(RegionLayoutError, match="itemsize"):
        r.tensor(torch.float32, (2,), offset_bytes=2)
    with pytest.raises(RegionLayoutError, match="offset_bytes"):
        r.tensor(torch.float32, (2,), offset_bytes=-4)
    with pytest.raises(RegionLayoutError, match="shape"):
        r.tensor(torch.float32, (2, -1))
    with pytest.raises(RegionLayoutError, match="dtype"):
        r.tensor("float32", (2,))
    with pytest.raises(RegionLayoutError, match="needs"):
        r.carve({"k": (torch.float32, (r.nbytes // 4,)), "v": (torch.float32, (1,))})
    with pytest.raises(RegionLayoutError, match="power of two"):
        r.carve({"k": (torch.float32, (1,))}, align=96)
    with pytest.raises(RegionLayoutError, match="itemsize"):
        r.carve({"k": (torch.float64, (1,))}, align=4)
    with pytest.raises(RegionLayoutError, match="duplicate"):
        r.carve([("k", torch.float32, (1,)), ("k", torch.float32, (1,))])
    with pytest.raises(RegionLayoutError, match="spec"):
        r.carve([("k", torch.float32)])
    with pytest.raises(RegionLayoutError, match="granularity"):
        KVRegion(MiB, device="cpu", granularity="huge")
    with pytest.raises(RegionLayoutError, match="device"):
        KVRegion(MiB, device="meta")


def test_errors_are_user_facing():
    assert issubclass(StandbyMemoryError, CompilepassError)
    assert issubclass(CudaDriverError, StandbyError)
    assert issubclass(RegionLayoutError, ValueError)
    if not CUDA:
        with pytest.raises(StandbyError, match="needs CUDA"):
            KVRegion(MiB, device="cuda")


def test_closed_region_and_context_manager():
    with KVRegion(MiB, device="cpu") as r:
        t = r.tensor(torch.float32, (4,))
    assert r.is_closed
    r.close()  # idempotent
    for call in (r.sleep, r.wake, lambda: r.tensor(torch.float32, (4,)), lambda: r.carve({})):
        with pytest.raises(RegionClosedError):
            call()
    t.fill_(1.0)  # CPU views keep their buffer alive


def test_free_device_memory_shape():
    free, total = free_device_memory("cpu")
    assert 0 < free <= total


# ---------------------------------------------------- driver logic against a stand-in driver


class _R(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2


class _Struct:
    def __init__(self):
        self.location = type("Loc", (), {})()


class FakeDriver:
    """Enough of cuda.bindings.driver to run _DriverVMM: tracks reservations, handles, maps."""

    CUresult = _R
    CUmemAllocationProp = _Struct
    CUmemAccessDesc = _Struct

    class CUmemAllocationType:
        CU_MEM_ALLOCATION_TYPE_PINNED = 1

    class CUmemLocationType:
        CU_MEM_LOCATION_TYPE_DEVICE = 1

    class CUmemAccess_flags:
        CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3

    class CUmemAllocationGranularity_flags:
        CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
        CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1

    class CUdevice_attribute:
        CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102

    CUdeviceptr = int

    def __init__(self, capacity=64 * MiB, granularity=2 * MiB):
        self.capacity = capacity
        self.granularity = granularity
        self.used = 0
        self.handles = {}  # handle -> size
        self.maps = {}  # address -> (size, handle)
        self.access = {}
        self.reserved = {}
        self.ctx_refs = 0
        self.ctx_stack = 0
        self.fail = {}  # call name -> (CUresult, on which call number)
        self.calls = {}
        self._next = 1
        self.vmm_supported = 1

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        err, at = self.fail.get(name, (None, None))
        if err is not None and self.calls[name] == at:
            return err
        return _R.CUDA_SUCCESS

    def cuGetErrorName(self, err):
        return _R.CUDA_SUCCESS, err.name.encode()

    def cuGetErrorString(self, err):
        return _R.CUDA_SUCCESS, b"stand-in error"

    def cuInit(self, flags):
        return (self._count("cuInit"),)

    def cuDeviceGet(self, ordinal):
        return self._count("cuDeviceGet"), ordinal

    def cuDeviceGetAttribute(self, attr, dev):
        return self._count("cuDeviceGetAttribute"), self.vmm_supported

    def cuDevicePrimaryCtxRetain(self, dev):
        self.ctx_refs += 1
        return self._count("cuDevicePrimaryCtxRetain"), "ctx"

    def cuDevicePrimaryCtxRelease(self, dev):
        self.ctx_refs -= 1
        return (self._count("cuDevicePrimaryCtxRelease"),)

    def cuCtxPushCurrent(self, ctx):
        self.ctx_stack += 1
        return (self._count("cuCtxPushCurrent"),)

    def cuCtxPopCurrent(self):
        self.ctx_stack -= 1
        return self._count("cuCtxPopCurrent"), "ctx"

    def cuMemGetAllocationGranularity(self, prop, flag):
        assert prop.type == 1 and prop.location.type == 1
        return self._count("cuMemGetAllocationGranularity"), self.granularity

    def cuMemGetInfo(self):
        return self._count("cuMemGetInfo"), self.capacity - self.used, self.capacity

    def cuMemAddressReserve(self, size, align, addr, flags):
        assert size % self.granularity == 0
        base = 0x7F0000000000 + len(self.reserved) * (1 << 36)
        self.reserved[base] = size
        return self._count("cuMemAddressReserve"), base

    def cuMemAddressFree(self, ptr, size):
        ptr = int(ptr)
        assert self.reserved.pop(ptr) == size
        assert not any(ptr <= a < ptr + size for a in self.maps), "freeing a mapped range"
        return (self._count("cuMemAddressFree"),)

    def cuMemCreate(self, size, prop, flags):
        err = self._count("cuMemCreate")
        if err:
            return err, None
        assert size % self.granularity == 0
        if self.used + size > self.capacity:
            return _R.CUDA_ERROR_OUT_OF_MEMORY, None
        h, self._next = self._next, self._next + 1
        self.handles[h] = size
        self.used += size
        return _R.CUDA_SUCCESS, h

    def cuMemRelease(self, handle):
        self.used -= self.handles.pop(handle)
        return (self._count("cuMemRelease"),)

    def cuMemMap(self, ptr, size, offset, handle, flags):
        err = self._count("cuMemMap")
        if err:
            return (err,)
        ptr = int(ptr)
        assert self.handles[handle] == size and offset == 0
        assert any(b <= ptr and ptr + size <= b + s for b, s in self.reserved.items())
        assert ptr not in self.maps
        self.maps[ptr] = (size, handle)
        return (_R.CUDA_SUCCESS,)

    def cuMemSetAccess(self, ptr, size, descs, count):
        err = self._count("cuMemSetAccess")
        if err:
            return (err,)
        ptr = int(ptr)
        assert self.maps[ptr][0] == size and count == 1 and descs[0].flags == 3
        self.access[ptr] = size
        return (_R.CUDA_SUCCESS,)

    def cuMemUnmap(self, ptr, size):
        ptr = int(ptr)
        assert self.maps.pop(ptr)[0] == size
        self.access.pop(ptr, None)
        return (self._count("cuMemUnmap"),)


def _vmm(driver, nbytes, **kw):
    hooks = {"before": 0, "sync": 0}

    def before():
        hooks["before"] += 1

    def sync():
        hooks["sync"] += 1

    vmm = _DriverVMM(driver, 0, nbytes, before_map=before, synchronize=sync, **kw)
    return vmm, hooks


def test_vmm_map_unmap_round_trip():
    d = FakeDriver()
    vmm, hooks = _vmm(d, 5 * MiB)
    assert vmm.nbytes == 6 * MiB and vmm.granularity == 2 * MiB and vmm.chunk_bytes == 6 * MiB
    base = vmm.base_address
    assert not vmm.mapped and d.used == 0
    for _ in range(3):
        vmm.map()
        vmm.map()  # idempotent
        assert vmm.mapped and d.used == 6 * MiB and list(d.maps) == [base]
        assert d.access == {base: 6 * MiB}
        vmm.unmap()
        vmm.unmap()
        assert not vmm.mapped and d.used == 0 and not d.maps and not d.handles
        assert vmm.base_address == base and d.reserved == {base: 6 * MiB}
    assert hooks == {"before": 3, "sync": 3}
    assert d.ctx_stack == 0
    vmm.map()
    vmm.free()
    assert d.used == 0 and not d.reserved and d.ctx_refs == 0
    vmm.free()  # idempotent
    with pytest.raises(RegionClosedError):
        vmm.map()


def test_vmm_chunks_and_minimum_granularity():
    d = FakeDriver()
    vmm, _ = _vmm(d, 9 * MiB, chunk_bytes=3 * MiB, granularity="minimum")
    assert vmm.nbytes == 10 * MiB and vmm.chunk_bytes == 4 * MiB
    vmm.map()
    sizes = sorted((a - vmm.base_address, s) for a, (s, _) in d.maps.items())
    assert sizes == [(0, 4 * MiB), (4 * MiB, 4 * MiB), (8 * MiB, 2 * MiB)]
    assert d.used == 10 * MiB
    vmm.unmap()
    assert d.used == 0 and not d.maps
    vmm.free()


def test_vmm_short_memory_is_a_clear_error():
    d = FakeDriver(capacity=16 * MiB)
    d.used = 12 * MiB  # someone else holds most of the device
    vmm, hooks = _vmm(d, 8 * MiB)
    with pytest.raises(StandbyMemoryError) as info:
        vmm.map()
    msg = str(info.value)
    assert "8388608 bytes" in msg and "4194304 bytes" in msg and "free" in msg
    assert info.value.needed == 8 * MiB and info.value.free == 4 * MiB
    assert hooks["before"] == 1  # the cache was emptied before checking
    assert not vmm.mapped and d.used == 12 * MiB and not d.maps
    d.used = 0
    vmm.map()
    assert vmm.mapped
    vmm.free()


def test_vmm_partial_failure_rolls_back():
    d = FakeDriver()
    d.fail["cuMemCreate"] = (_R.CUDA_ERROR_OUT_OF_MEMORY, 3)  # third chunk fails
    vmm, _ = _vmm(d, 8 * MiB, chunk_bytes=2 * MiB)
    with pytest.raises(StandbyMemoryError, match="cuMemCreate ran out of device memory") as info:
        vmm.map()
    assert "4194304 bytes" in str(info.value)  # two chunks had been mapped
    assert not vmm.mapped and d.used == 0 and not d.maps and not d.handles
    assert d.ctx_stack == 0
    vmm.map()  # a later wake works
    assert d.used == 8 * MiB
    vmm.free()


def test_vmm_driver_error_names_the_call():
    d = FakeDriver()
    d.fail["cuMemSetAccess"] = (_R.CUDA_ERROR_INVALID_VALUE, 2)
    vmm, _ = _vmm(d, 4 * MiB, chunk_bytes=2 * MiB)
    with pytest.raises(CudaDriverError, match=r"cuMemSetAccess failed: CUDA_ERROR_INVALID_VALUE \(1\)") as info:
        vmm.map()
    assert info.value.call == "cuMemSetAccess" and info.value.code == 1
    assert not vmm.mapped and d.used == 0 and not d.maps
    d2 = FakeDriver()
    d2.fail["cuMemAddressReserve"] = (_R.CUDA_ERROR_INVALID_VALUE, 1)
    with pytest.raises(CudaDriverError, match="cuMemAddressReserve"):
        _vmm(d2, 4 * MiB)
    d3 = FakeDriver()
    d3.vmm_supported = 0
    with pytest.raises(StandbyError, match="virtual memory management"):
        _vmm(d3, 4 * MiB)


def test_vmm_dropped_frees_everything():
    d = FakeDriver()
    vmm, _ = _vmm(d, 4 * MiB)
    vmm.map()
    del vmm
    gc.collect()
    assert d.used == 0 and not d.reserved and not d.maps and d.ctx_refs == 0


def test_vmm_with_the_real_bindings_types():
    """The names _DriverVMM uses exist in cuda.bindings.driver; its structs and enums work.

    Functions still come from the stand-in (there is no driver here); the structs, enums and
    CUdeviceptr are the real ones, so a misspelt field or enum member fails here, not on a GPU.
    """
    real = pytest.importorskip("cuda.bindings.driver", reason="cuda-bindings is not installed")

    class Hybrid(FakeDriver):
        pass

    for name in (
        "CUmemAllocationProp",
        "CUmemAccessDesc",
        "CUmemAllocationType",
        "CUmemLocationType",
        "CUmemAccess_flags",
        "CUmemAllocationGranularity_flags",
        "CUdevice_attribute",
        "CUdeviceptr",
    ):
        setattr(Hybrid, name, getattr(real, name))
    functions = [n for n in dir(FakeDriver) if n.startswith("cu")]
    assert functions and all(hasattr(real, n) for n in functions), [n for n in functions if not hasattr(real, n)]
    assert int(real.CUresult.CUDA_ERROR_OUT_OF_MEMORY) == int(_R.CUDA_ERROR_OUT_OF_MEMORY)
    d = Hybrid()
    vmm, _ = _vmm(d, 3 * MiB, chunk_bytes=2 * MiB)
    vmm.map()
    assert d.used == 4 * MiB and len(d.maps) == 2
    vmm.unmap()
    vmm.free()
    assert not d.reserved and d.ctx_refs == 0


# ------------------------------------------------------------------------------- GPU only


@needs_cuda
def test_gpu_addresses_stable_and_memory_released():
    torch.cuda.synchronize()
    region = KVRegion(512 * MiB)
    gran = region.granularity
    kv = region.carve({"k": (torch.bfloat16, (64, 1024, 128)), "v": (torch.bfloat16, (64, 1024, 128))})
    ptrs = {n: t.data_ptr() for n, t in kv.items()}
    assert kv["k"].data_ptr() == region.base_address
    kv["k"].fill_(1)
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # wake() empties torch's cache: start from an empty one
        free_awake, _ = free_device_memory()
        region.sleep()
        free_asleep, _ = free_device_memory()
        assert abs((free_asleep - free_awake) - region.nbytes) <= gran, (free_awake, free_asleep)
        region.wake()
        free_again, _ = free_device_memory()
        assert abs((free_asleep - free_again) - region.nbytes) <= gran, (free_asleep, free_again)
        assert {n: t.data_ptr() for n, t in kv.items()} == ptrs
        kv["k"].fill_(2)
        kv["v"].copy_(kv["k"])
        torch.cuda.synchronize()
        assert kv["v"].float().sum().item() == 2 * kv["v"].numel()
    region.close()


@needs_cuda
def test_gpu_graph_replays_after_sleep_wake():
    region = KVRegion(64 * MiB)
    t = region.carve({"k": (torch.float32, (256, 256)), "out": (torch.float32, (256, 256))})
    k, out = t["k"], t["out"]
    w = torch.randn(256, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def fill():
        k.copy_(torch.arange(256 * 256, device="cuda", dtype=torch.float32).view(256, 256).remainder(17))

    fill()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.matmul(k, w, out=out)  # warm up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.matmul(k, w, out=out)
        k.mul_(2)
    fill()
    graph.replay()
    torch.cuda.synchronize()
    expected = out.clone()
    expected_k = k.clone()  # the graph doubled it in place
    for _ in range(3):
        region.sleep()
        region.wake()
        fill()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
        assert torch.equal(k, expected_k)
    del graph
    region.close()


@needs_cuda
def test_gpu_wake_with_short_memory_is_a_clear_error():
    region = KVRegion(1024 * MiB)
    region.sleep()
    torch.cuda.empty_cache()
    free, _ = free_device_memory()
    hog = torch.empty(free - 512 * MiB, dtype=torch.uint8, device="cuda")
    with pytest.raises(StandbyMemoryError, match="needs") as info:
        region.wake()
    assert info.value.needed == region.nbytes and info.value.free < region.nbytes
    assert not region.is_awake
    del hog
    region.wake()
    assert region.is_awake
    region.as_bytes().fill_(1)
    torch.cuda.synchronize()
    region.close()

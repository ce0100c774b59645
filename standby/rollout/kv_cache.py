"""The rollout engine's static KV cache: its layout and where its memory comes from.

The cache is per layer K and V, each [batch, kv_heads, max_len, head_dim], either carved from a
:class:`~compilepass.standby.memory.KVRegion` (sleep/wake release and restore its physical memory
at the same addresses) or allocated as ordinary tensors.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from compilepass.core.shapes import ModelShape
from compilepass.standby.memory.driver import CudaArray
from compilepass.standby.memory.layout import required_bytes
from compilepass.standby.memory.region import KVRegion
from compilepass.standby.rollout.decode import StaticKVCache

__all__ = ["build_kv_cache", "kv_cache_specs"]


def kv_cache_specs(shape: ModelShape, batch: int, max_len: int, dtype: torch.dtype) -> list[tuple]:
    """The KV region's layout (``KVRegion.carve`` / ``required_bytes`` specs): per layer, K then V,
    each [batch, kv_heads, max_len, head_dim]."""
    dims = (batch, shape.num_kv_heads, max_len, shape.head_dim)
    return [(f"{kind}{i}", dtype, dims) for i in range(shape.num_layers) for kind in "kv"]


def build_kv_cache(shape: ModelShape, batch: int, max_len: int, dtype: torch.dtype, device: torch.device,
                   kv_region: bool = True) -> tuple[Optional[KVRegion], StaticKVCache]:
    """(region, cache): with ``kv_region`` the cache's tensors live in a new, zeroed region (each
    with a storage of its own), else (None, a cache of ordinary tensors)."""
    if not kv_region:
        return None, StaticKVCache(shape, batch, max_len, dtype, device)
    specs = kv_cache_specs(shape, batch, max_len, dtype)
    region = KVRegion(required_bytes(specs), device=device)
    views = region.carve(specs)
    k = [_separate_storage(views[f"k{i}"]) for i in range(shape.num_layers)]
    v = [_separate_storage(views[f"v{i}"]) for i in range(shape.num_layers)]
    region.as_bytes().zero_()  # no NaN bit patterns under masked positions
    return region, StaticKVCache.from_tensors(shape, k, v)


class _HostArray:
    """A numpy array interface over ``n`` bytes at host address ``ptr``, keeping ``owner`` alive."""

    def __init__(self, ptr: int, n: int, owner):
        self._owner = owner
        self.__array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (ptr, False),
                                    "strides": None, "version": 3}


def _separate_storage(t: torch.Tensor) -> torch.Tensor:
    """The same memory as ``t`` (zero-copy) as a tensor with a storage of its own.

    ``KVRegion.carve`` views all share the region's one storage; torch.compile treats inputs that
    share a storage as aliased and mutates them through a slow synthetic-base path. The wrapper
    keeps ``t`` (hence the region's mapping) alive.
    """
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cuda":
        with torch.cuda.device(t.device):
            raw = torch.as_tensor(CudaArray(t.data_ptr(), nbytes, t), device=t.device)
    else:
        raw = torch.from_numpy(np.asarray(_HostArray(t.data_ptr(), nbytes, t)))
    out = raw.view(t.dtype).view(t.shape)
    if out.data_ptr() != t.data_ptr():  # pragma: no cover - a torch contract
        raise RuntimeError("re-wrapping a KV tensor copied it")
    return out

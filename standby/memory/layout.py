"""Layouts over a region: tensor specs, aligned offsets, the bytes a layout needs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple, Union

import torch

from compilepass.standby.memory.errors import RegionLayoutError

MiB = 1 << 20
#: Granule used by the CPU fallback, chosen equal to the usual CUDA granularity (2 MiB) so that
#: rounded sizes and carve() layouts are the same on CPU and GPU.
CPU_GRANULARITY = 2 * MiB
#: Default alignment of each tensor laid out by :meth:`KVRegion.carve`.
DEFAULT_ALIGN = 256


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_size(nbytes: Any, what: str = "nbytes") -> int:
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


def itemsize(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise RegionLayoutError(f"dtype must be a torch.dtype, got {dtype!r}")
    size = getattr(dtype, "itemsize", None)  # torch >= 2.1
    return size if size is not None else torch.empty((), dtype=dtype).element_size()


def check_shape(shape: Any) -> Tuple[int, ...]:
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


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a :meth:`KVRegion.carve` layout."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


SpecsLike = Union[
    Mapping[str, Tuple[torch.dtype, Sequence[int]]],
    Iterable[Union[TensorSpec, Tuple[str, torch.dtype, Sequence[int]]]],
]


def normalize_specs(specs: SpecsLike) -> List[TensorSpec]:
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
            spec = TensorSpec(str(name), dtype, check_shape(shape))
        itemsize(spec.dtype)
        items.append(TensorSpec(spec.name, spec.dtype, check_shape(spec.shape)))
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
    items = normalize_specs(specs)
    if isinstance(offset_bytes, bool) or not isinstance(offset_bytes, int) or offset_bytes < 0:
        raise RegionLayoutError(f"offset_bytes must be a non-negative int, got {offset_bytes!r}")
    offsets: Dict[str, int] = {}
    cursor = offset_bytes
    for spec in items:
        size = itemsize(spec.dtype)
        if align % size:
            raise RegionLayoutError(f"align={align} is not a multiple of {spec.dtype}'s itemsize {size}")
        cursor = round_up(cursor, align)
        offsets[spec.name] = cursor
        cursor += spec.nbytes
    return offsets, cursor


def required_bytes(specs: SpecsLike, align: int = DEFAULT_ALIGN) -> int:
    """Bytes a region needs (before rounding to the granularity) to :meth:`~KVRegion.carve` specs."""
    return plan_layout(specs, align)[1]

"""The standby memory errors (each a :class:`~compilepass.core.errors.CompilepassError`: one line
from the CLI)."""

from __future__ import annotations

from typing import Optional

from compilepass.core.errors import CompilepassError

GiB = 1 << 30


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


def fmt_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB ({n} bytes)"


def fmt_gib(n: float) -> str:
    """Bytes as GiB with two decimals, for one-line messages."""
    return f"{n / GiB:.2f} GiB"

"""Offload the activations that autograd saves to pinned host memory, on a side stream.

With gradient checkpointing, what stays on the GPU between the forward and the backward pass
is one hidden state per decoder layer (each checkpointed layer's input): ``tokens x hidden``
bf16 per layer, 20 GiB for a 64-layer, 5120-wide model at 32k tokens. :class:`ActivationOffload`
moves those to pinned CPU memory as the forward pass produces them and brings each one back
when the backward pass reaches its layer.

How: a ``torch.autograd.graph.saved_tensors_hooks`` context. ``pack`` (called when autograd
saves a tensor) starts a device-to-host copy on a side stream after the producing kernels (the
side stream waits on the compute stream), records the GPU block on that stream (the caching
allocator reuses it only once the copy is done) and returns the host tensor with an event.
``unpack`` (backward) makes the compute stream wait for the event and copies the tensor back,
non-blocking, on the compute stream. Model parameters (weights saved by matmuls: the frozen
base weights must never be copied) and tensors below ``min_bytes`` stay where they are.

Use it with *reentrant* checkpointing (``use_reentrant=True``): a reentrant checkpoint saves its
inputs through ``save_for_backward``, which these hooks see; the non-reentrant implementation
keeps them referenced from its own frame, out of reach of any hook (nothing would be freed).

With ``device`` a CPU device (or no CUDA at all) nothing is offloaded (``active`` is False)
unless ``force=True``, which copies CPU tensors to new CPU tensors — the same pack/unpack path,
for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

__all__ = ["ActivationOffload", "OffloadStats"]


@dataclass
class OffloadStats:
    """Counters of one :class:`ActivationOffload` context (bytes, tensors)."""

    offloaded_tensors: int = 0
    offloaded_bytes: int = 0
    kept_tensors: int = 0
    restored_tensors: int = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Packed:
    __slots__ = ("host", "device", "event")

    def __init__(self, host, device, event):
        self.host, self.device, self.event = host, device, event


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """``with ActivationOffload(model.parameters()): loss = forward(...)`` then ``loss.backward()``.

    ``params``: tensors never to offload (their storages are compared, so views and transposes
    of a weight are recognised). ``min_bytes``: smaller tensors stay on the device (the copy's
    fixed cost outweighs them). ``stream``: the side stream of the copies (default: a new one).
    """

    def __init__(self, params: Iterable[torch.Tensor] = (), *, min_bytes: int = 1 << 20,
                 device: Optional[torch.device] = None, force: bool = False,
                 stream: Optional["torch.cuda.Stream"] = None):
        self.min_bytes = int(min_bytes)
        self.stats = OffloadStats()
        self._param_storages = {p.untyped_storage().data_ptr() for p in params}
        cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        self.active = bool(cuda or force)
        self._cuda = cuda
        self._stream = stream if stream is not None or not cuda else torch.cuda.Stream(device)
        super().__init__(self._pack, self._unpack)

    def _keep(self, t: torch.Tensor) -> bool:
        if not self.active or _nbytes(t) < self.min_bytes or t.layout != torch.strided:
            return True
        if self._cuda and not t.is_cuda:
            return True
        if not self._cuda and t.device.type != "cpu":
            return True
        return t.untyped_storage().data_ptr() in self._param_storages

    def _pack(self, t: torch.Tensor):
        if self._keep(t):
            self.stats.kept_tensors += 1
            return t
        self.stats.offloaded_tensors += 1
        self.stats.offloaded_bytes += _nbytes(t)
        if not self._cuda:  # force=True on CPU: the same bookkeeping, a host-to-host copy
            return _Packed(t.detach().clone(memory_format=torch.contiguous_format), t.device, None)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        compute = torch.cuda.current_stream(t.device)
        self._stream.wait_stream(compute)  # the producing kernels first
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        t.record_stream(self._stream)  # the block is reused only after the copy has read it
        return _Packed(host, t.device, event)

    def _unpack(self, packed):
        if not isinstance(packed, _Packed):
            return packed
        self.stats.restored_tensors += 1
        if packed.event is None:
            return packed.host.to(packed.device)
        compute = torch.cuda.current_stream(packed.device)
        compute.wait_event(packed.event)  # the offload copy has landed in host memory
        return packed.host.to(packed.device, non_blocking=True)

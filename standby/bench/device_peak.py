"""The device's peak used memory over a block of code, as the driver reports it.

``torch.cuda.max_memory_allocated`` sees only torch's allocator; vLLM's KV cache lives in torch's
allocator but is unmapped while it sleeps (torch still counts it allocated), and the native engine's
KV region is mapped with the CUDA driver outside torch. :class:`DevicePeak` polls
``torch.cuda.mem_get_info`` from a thread (every ``interval_s``) and keeps the largest
``total - free - held_bytes`` seen (``held_bytes``: what a
:class:`~compilepass.standby.memory.cap.DeviceMemoryCap` holds, so the figure is on the capped card).
"""

from __future__ import annotations

import threading

import torch


class DevicePeak:
    """``with DevicePeak(device) as p: ...`` then ``p.peak_bytes`` (0 on a device without CUDA)."""

    def __init__(self, device, held_bytes: int = 0, interval_s: float = 0.005):
        self.device = torch.device(device)
        self.held_bytes = int(held_bytes)
        self.interval_s = float(interval_s)
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = None

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free - self.held_bytes

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self._used())

    def __enter__(self) -> "DevicePeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = self._used()
            self._thread = threading.Thread(target=self._poll, name="device-peak", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, self._used())
            self._stop.set()
            self._thread.join()
            self._thread = None

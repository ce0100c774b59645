"""LoRA merged into the base weights for generation, the base weights restored exactly afterwards.

A decode step with LoRA runs the adapters' small GEMMs beside every projection (about 4 extra
kernels per layer with packed groups); merged into the base weights they cost nothing per step.
:class:`LoraMerge` does that for the length of a generation without a second copy of the weights on
the device:

- on entry, each LoRA layer's frozen base weight is copied once to host memory (pinned on CUDA), then
  peft's own ``merge`` adds ``scaling * B @ A`` into the base weight in place (same tensor, same
  address: the fused projections and the CUDA graphs read it) and marks the adapter merged, so the
  decoder and peft's ``forward`` leave the adapter out;
- on exit, each base weight is copied back from its host copy (bitwise the weight before the merge,
  not ``W + delta - delta`` rounded twice in bf16, as peft's ``unmerge`` would give) and the merged mark
  removed, so the trainer's next forward sees the exact base and the live adapters.

The host copies are taken again when a base weight was replaced or changed in place since (its
``data_ptr`` or autograd version moved); a change through ``.data`` bumps no version and is not seen:
base weights are frozen under LoRA. A 4-bit base cannot be merged (refused).

Cost per merge/restore cycle: one host-to-device copy of the LoRA layers' base weights (about 1.2 GB
for qwen3-0.6b; PCIe bandwidth) and one ``B @ A`` per layer. Generated log-probs come from the merged
bf16 weights, which round differently from the trainer's unmerged product: the engine's and trainer's
log-probs differ a little more than unmerged (the importance-sampling correction covers that gap).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from compilepass.core.errors import ConfigError
from compilepass.standby.rollout.fused import _is_lora_layer

log = logging.getLogger(__name__)

__all__ = ["LoraMerge"]


@dataclass
class _HostCopy:
    tensor: torch.Tensor  # on the host, pinned on CUDA
    data_ptr: int
    version: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _base_weight(module) -> torch.Tensor:
    return module.get_base_layer().weight


class LoraMerge:
    """``LoraMerge(model)``: ``with merge.merged(): ...`` runs its body with every active LoRA adapter of
    ``model`` merged into the base weights (see the module doc). Re-entrant: a nested ``merged()`` is
    part of the outer one. ``active``: inside a ``merged()``."""

    def __init__(self, model):
        self.modules = [m for m in model.modules() if _is_lora_layer(m)]
        for m in self.modules:
            w = _base_weight(m)
            if not w.is_floating_point() or w.element_size() < 2 or type(m.get_base_layer()) is not torch.nn.Linear:
                raise ConfigError(f"merge_lora needs 16- or 32-bit torch.nn.Linear base layers; "
                                  f"{type(m.get_base_layer()).__name__} ({w.dtype}) cannot take a merged adapter "
                                  f"(a 4-bit base: use merge_lora=False)")
            biased = [n for n, on in getattr(m, "lora_bias", {}).items() if on]
            if biased:
                raise ConfigError(f"merge_lora restores base weights only; adapter {biased[0]!r} trains a bias "
                                  f"(lora_bias=True): use merge_lora=False")
            variants = [n for n in getattr(m, "lora_variant", {}) if n in m.active_adapters]
            if variants:
                raise ConfigError(f"merge_lora merges vanilla LoRA only; adapter {variants[0]!r} is a "
                                  f"{type(m.lora_variant[variants[0]]).__name__}: use merge_lora=False")
        self._host: dict[int, _HostCopy] = {}
        self._merged: list = []  # (module, adapter names) merged by the current cycle
        self._depth = 0
        self.cycles = 0
        self.snapshots = 0  # host copies taken (the first ones and every refresh)
        self.last_cycle_s = 0.0  # the last cycle's merge + restore, wall (device work included)

    @property
    def active(self) -> bool:
        return self._depth > 0

    @contextlib.contextmanager
    def merged(self) -> Iterator["LoraMerge"]:
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._depth = 1
        device = _base_weight(self.modules[0]).device if self.modules else torch.device("cpu")
        t0 = time.perf_counter()
        merge_s = 0.0
        try:
            self._merge()
            _sync(device)
            merge_s = time.perf_counter() - t0
            yield self
        finally:
            t1 = time.perf_counter()
            try:
                self._restore()
                _sync(device)
            finally:
                self._depth = 0
                self.last_cycle_s = merge_s + time.perf_counter() - t1

    def _host_copy(self, module) -> None:
        w = _base_weight(module)
        rec = self._host.get(id(module))
        if rec is not None and rec.data_ptr == w.data_ptr() and rec.version == w._version \
                and rec.tensor.shape == w.shape and rec.tensor.dtype == w.dtype:
            return
        if rec is not None:
            log.info("merge_lora: the base weight under %s changed since its host copy; copying it again",
                     type(module).__name__)
        pin = w.device.type == "cuda"
        host = torch.empty(w.shape, dtype=w.dtype, device="cpu", pin_memory=pin)
        with torch.no_grad():
            host.copy_(w.detach())
        self._host[id(module)] = _HostCopy(host, w.data_ptr(), w._version)
        self.snapshots += 1

    def _merge(self) -> None:
        self._merged = []
        for m in self.modules:
            names = [n for n in m.active_adapters if n in m.lora_A.keys()]
            if m.disable_adapters or not names or m.merged:
                continue  # nothing active, or merged by someone else (left to them)
            self._host_copy(m)
            self._merged.append((m, names))  # before the merge: a failure half-way is still restored
            with torch.no_grad():
                m.merge(adapter_names=names)
        self.cycles += 1

    def _restore(self) -> None:
        merged, self._merged = self._merged, []
        with torch.no_grad():
            for m, names in merged:
                w = _base_weight(m)
                rec = self._host[id(m)]
                w.copy_(rec.tensor, non_blocking=True)  # stream-ordered before anything that reads w next
                rec.version = w._version
                for n in names:
                    if n in m.merged_adapters:
                        m.merged_adapters.remove(n)

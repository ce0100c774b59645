"""The one-line out-of-memory error of a GRPO step: what ran out, how much was asked and held, where the
state was saved, and which config keys would make the step fit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from compilepass.core.errors import CompilepassError
from compilepass.standby.grpo.config import GRPOConfig
from compilepass.standby.grpo.metrics import peak_memory_gib
from compilepass.standby.memory.errors import fmt_gib
from compilepass.standby.memory.region import free_device_memory

_TRIED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")


class TrainingOutOfMemoryError(CompilepassError):
    """Generation or the training step ran out of memory (the state was saved first)."""


def memory_measured(device: torch.device) -> str:
    """The step's memory high-water mark, in words: the allocator's peak on CUDA, the RSS peak on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        _, total = free_device_memory(device)  # under a DeviceMemoryCap: the capped card
        return f"peak allocated {fmt_gib(peak)} of {fmt_gib(total)}"
    return f"peak resident {peak_memory_gib():.2f} GiB"


def out_of_memory_error(phase: str, step: int, err: BaseException, config: GRPOConfig, measured: str,
                        saved: Optional[Path], failed_micro_batch: Optional[int] = None) -> TrainingOutOfMemoryError:
    """The error for an out-of-memory in ``phase`` ("generate" or "train") of ``step``."""
    c = config
    tried = _TRIED.search(str(err))
    need = f"tried to allocate {tried.group(1)} more, {measured}" if tried else measured
    if getattr(err, "needed", None):  # StandbyMemoryError: waking the KV region failed
        free = getattr(err, "free", None)
        need = (f"waking the KV region needs {fmt_gib(err.needed)}"
                + (f", {fmt_gib(free)} free" if free is not None else "") + f"; {measured}")
    where = f"state saved in {saved}" if saved is not None else "the state could NOT be saved"
    hints = (f"lower generation.max_completion_len (now {c.generation.max_completion_len}) or "
             f"data.prompts_per_step (now {c.data.prompts_per_step}) or generation.num_generations "
             f"(now {c.generation.num_generations})")
    if phase == "train":
        if failed_micro_batch is not None:
            need += f"; {failed_micro_batch} sequence(s) per forward"
        if c.optim.micro_batch_size > 1:
            hints += f", lower optim.micro_batch_size (now {c.optim.micro_batch_size}; 0 = automatic)"
        if not c.model.gradient_checkpointing:
            hints += ", set model.gradient_checkpointing=true"
        if not c.model.offload_activations:
            hints += ", or model.offload_activations=true"
    else:
        hints += ", or lower generation.gpu_memory_utilization to leave room for activations"
    return TrainingOutOfMemoryError(f"out of memory during {'generation' if phase == 'generate' else 'training'} "
                                    f"at step {step} ({need}); {where}; {hints}")

"""How many sequences the engine decodes at once: the KV cache sized from ``gpu_memory_utilization``
of the free device memory, less what training keeps across later wakes."""

from __future__ import annotations

import logging

from compilepass.core.errors import CompilepassError
from compilepass.standby.memory.errors import fmt_gib
from compilepass.standby.memory.layout import required_bytes
from compilepass.standby.rollout.kv_cache import kv_cache_specs

log = logging.getLogger(__name__)


class KVMemoryError(CompilepassError):
    """The engine's KV region does not fit in ``gpu_memory_utilization`` of the free GPU memory."""


def plan_kv_batch(shape, dtype, batch: int, max_len: int, free: int, total: int, utilization: float,
                  reserve: int = 0) -> int:
    """How many sequences the engine decodes at once: all ``batch`` when their KV cache fits in
    ``utilization`` x (the free device memory - ``reserve``), else as many as fit (the engine then
    generates in chunks of that many, logged). ``reserve``: bytes that training will hold across
    the wake that follows it (the LoRA gradients and optimizer state, allocated at the first step,
    after this plan). Raises KVMemoryError when not even one sequence fits."""
    def need(b: int) -> int:
        return required_bytes(kv_cache_specs(shape, b, max_len, dtype))

    budget = max(free - reserve, 0) * utilization
    full = need(batch)
    if full <= budget:
        return batch
    fit = min(batch - 1, int(budget // max(need(1), 1)))
    while fit >= 1 and need(fit) > budget:
        fit -= 1
    held = f" - {fmt_gib(reserve)} kept for the LoRA gradients and optimizer state" if reserve else ""
    where = (f"{fmt_gib(budget)} is available ({utilization:g} x ({fmt_gib(free)} free of {fmt_gib(total)}"
             f"{held}))")
    if fit < 1:
        raise KVMemoryError(
            f"the KV cache of one sequence of {max_len} tokens (max_prompt_len + max_completion_len) needs "
            f"{fmt_gib(need(1))} but {where}; lower generation.max_completion_len or generation.max_prompt_len")
    log.warning("the KV cache of all %d sequences (prompts_per_step x num_generations) needs %s but %s: "
                "generating %d sequences at a time", batch, fmt_gib(full), where, fit)
    return fit

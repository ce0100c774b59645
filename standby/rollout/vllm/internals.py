"""Reaching into an in-process vLLM: its model runner, plain CPU linears, scoped environment variables."""

from __future__ import annotations

import contextlib
import os

import torch


def vllm_model_runner(llm):
    """The model runner of an in-process ``vllm.LLM`` (V1: LLMEngine -> InprocClient -> EngineCore ->
    UniProcExecutor -> worker -> model_runner)."""
    core_client = getattr(llm.llm_engine, "engine_core", None)
    core = getattr(core_client, "engine_core", None)
    executor = getattr(core, "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    worker = getattr(worker, "worker", worker)
    runner = getattr(worker, "model_runner", None)
    if runner is None:
        raise RuntimeError("vLLM's model runner is not reachable from this process: the engine core runs in another "
                           "process (VLLM_ENABLE_V1_MULTIPROCESSING must be 0 while the LLM is built)")
    return runner


def _plain_linear(x, weight, bias=None):
    return torch.nn.functional.linear(x, weight, bias)


@contextlib.contextmanager
def plain_cpu_linears():
    """While vLLM builds a model on its CPU backend: linear layers keep their weight tensor and run
    ``torch.nn.functional.linear`` on it (vLLM's own fallback when oneDNN is unavailable), instead
    of repacking it into a oneDNN/AMX handle and replacing ``layer.weight`` by an empty tensor.
    Only so can the trainer's parameters be views of vLLM's weights on CPU. Restores itself; a
    no-op outside the CPU platform."""
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer, remove_weight):
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta or weight.ndim != 2:
            return original(layer, remove_weight)
        layer.cpu_linear = _plain_linear

    layer_utils.dispatch_cpu_unquantized_gemm = dispatch
    try:
        yield
    finally:
        layer_utils.dispatch_cpu_unquantized_gemm = original


@contextlib.contextmanager
def scoped_env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

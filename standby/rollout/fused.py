"""Fused projections: q/k/v and gate/up as one GEMM each, over fused weight tensors that the model's
own parameters are re-pointed into (still one copy of the weights).

LoRA: where every member has one adapter (the GRPO case), the members' A matrices are packed into
one ``[sum r, in]`` tensor and their B matrices into one block-diagonal ``[sum out, sum r]`` tensor
(``PackedLoRA``), so a group's adapters cost two GEMMs instead of one cat, one A GEMM and one B GEMM
per member. The packed tensors are copies refreshed by :meth:`FusedProjections.sync_adapters` (the
decoder calls it at every prefill, outside any CUDA graph); otherwise (or with ``pack=False``) the
deltas are read from the peft modules at every call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compilepass.core.errors import ConfigError
from compilepass.core.shapes import causal_lm_of


def _is_lora_layer(module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def _base_linear(module) -> torch.nn.Linear:
    base = module.base_layer if _is_lora_layer(module) else module
    if type(base) is not torch.nn.Linear:
        raise ConfigError(f"fused projections need plain torch.nn.Linear base layers, got {type(base).__name__}; "
                          "use fused_projections=False")
    return base


def _lora_terms(module) -> list:
    """The active vanilla LoRA adapters of ``module`` as (lora_A, lora_B, dropout, scaling), exactly the
    ones peft's ``Linear.forward`` would add: none for a plain Linear, a disabled adapter or a merged one
    (the merge lives in the base weight, which the fused weight is). Variants (DoRA, ...) are refused."""
    if not _is_lora_layer(module) or module.disable_adapters or module.merged:
        return []
    terms = []
    keys = module.lora_A.keys()
    for name in module.active_adapters:
        if name not in keys:
            continue
        if name in getattr(module, "lora_variant", {}):
            raise ConfigError(f"fused projections support vanilla LoRA only; adapter {name!r} is a "
                              f"{type(module.lora_variant[name]).__name__}: use fused_projections=False")
        terms.append((module.lora_A[name], module.lora_B[name], module.lora_dropout[name], module.scaling[name]))
    return terms


def _lora_input(module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as peft casts it for ``module``'s LoRA A (its ``_cast_input_dtype``: to A's dtype unless
    input casting is disabled)."""
    cast = getattr(module, "_cast_input_dtype", None)
    return cast(x, dtype) if cast is not None else x.to(dtype)


def _single_adapter_terms(terms: list) -> bool:
    """Whether each member has exactly one adapter, all of one dtype and device, with no dropout
    active: what ``PackedLoRA`` computes exactly as peft does."""
    if not terms or not all(len(t) == 1 for t in terms):
        return False
    w = [x for t in terms for x in (t[0][0].weight, t[0][1].weight)]
    return (len({x.dtype for x in w}) == 1 and len({x.device for x in w}) == 1
            and all(isinstance(t[0][2], torch.nn.Identity) or not t[0][2].training for t in terms))


def _terms_signature(terms: list) -> tuple:
    return tuple((id(A.weight), id(B.weight), tuple(A.weight.shape), tuple(B.weight.shape), A.weight.dtype,
                  A.weight.device, float(s)) for (A, B, _, s) in (t[0] for t in terms))


class PackedLoRA:
    """One adapter per member of a ``FusedLinear``, packed: ``a`` [sum r, in] stacks the A matrices,
    ``b`` [sum out, sum r] holds each B matrix as a diagonal block (zeros elsewhere) and ``scale``
    [sum out] each member's LoRA scaling. ``x @ a.T @ b.T * scale`` is then every member's delta,
    side by side, with the same products and sums as peft's per-member ``B(A(x)) * scaling`` (the
    zeros add nothing). The tensors are copies: :meth:`refresh` copies the adapters' current values
    in place (one ``_foreach_copy_``), so their addresses never change and a CUDA graph that reads
    them sees each refresh. Costs ``sum(out) * sum(r)`` extra elements (8B shapes, r=32, float32
    adapters: about 11 MB per layer)."""

    def __init__(self, terms: list, splits: list[int], in_features: int):
        As = [t[0][0].weight for t in terms]
        Bs = [t[0][1].weight for t in terms]
        dtype, device = As[0].dtype, As[0].device
        self.signature = _terms_signature(terms)
        ranks = [a.shape[0] for a in As]
        R = sum(ranks)
        with torch.no_grad():
            self.a = torch.empty((R, in_features), dtype=dtype, device=device)
            self.b = torch.zeros((sum(splits), R), dtype=dtype, device=device)
            self.scale = torch.empty(sum(splits), dtype=torch.float32, device=device)
        self._dst, self._src = [], []
        lo = c = 0
        for A, B, n, r, (_, _, _, s) in zip(As, Bs, splits, ranks, (t[0] for t in terms)):
            self._dst += [self.a[c:c + r], self.b[lo:lo + n, c:c + r]]
            self._src += [A, B]
            self.scale[lo:lo + n].fill_(float(s))
            lo, c = lo + n, c + r
        self.refresh()

    def refresh(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self._dst, [t.detach() for t in self._src])

    def delta(self, module, x: torch.Tensor) -> torch.Tensor:
        """Every member's LoRA delta for input ``x`` [..., in] -> [..., sum out], in the adapters'
        dtype (float32 scaling applied before the rounding, as a Python-float scaling is)."""
        a = F.linear(_lora_input(module, x, self.a.dtype), self.a)
        return (F.linear(a, self.b).float() * self.scale).to(self.a.dtype)


class FusedLinear:
    """Several Linear layers that read one input, as one GEMM over one weight tensor.

    The weight ``[sum(out_i), in]`` (and bias) is allocated once and the member layers' own
    ``weight`` / ``bias`` parameters are re-pointed (``param.data = fused[rows]``) to row slices of it:
    the parameter objects stay the same (an optimizer holding them keeps working, in-place updates
    land in the fused tensor), and there is still exactly one copy of the weights. LoRA adapters on
    the members are read from their modules at every call (never copied), so optimizer steps on them
    are seen at once.
    """

    def __init__(self, modules: list):
        self.modules = list(modules)
        bases = [_base_linear(m) for m in self.modules]
        w0 = bases[0].weight
        if any(b.weight.shape[1] != w0.shape[1] or b.weight.dtype != w0.dtype or b.weight.device != w0.device
               for b in bases):
            raise ConfigError("fused projections need members with one input size, dtype and device")
        has_bias = [b.bias is not None for b in bases]
        if any(has_bias) and not all(has_bias):
            raise ConfigError("fused projections need all members with a bias or none")
        self.splits = [b.weight.shape[0] for b in bases]
        self.bases = bases
        self.packed: PackedLoRA | None = None  # sync_adapters() builds it
        self.layout = 0  # how many times it was built
        rows = [0]
        for n in self.splits:
            rows.append(rows[-1] + n)
        self.rows = rows
        with torch.no_grad():
            self.weight = torch.empty((rows[-1], w0.shape[1]), dtype=w0.dtype, device=w0.device)
            self.bias = (torch.empty(rows[-1], dtype=bases[0].bias.dtype, device=w0.device)
                         if has_bias[0] else None)
            for b, lo, hi in zip(bases, rows, rows[1:]):
                self.weight[lo:hi].copy_(b.weight)
                b.weight.data = self.weight[lo:hi]
                if self.bias is not None:
                    self.bias[lo:hi].copy_(b.bias)
                    b.bias.data = self.bias[lo:hi]

    def is_intact(self) -> bool:
        """Whether every member parameter still lies in the fused tensors (false after the model was
        moved, cast, or a parameter replaced)."""
        for b, lo in zip(self.bases, self.rows):
            if b.weight.data_ptr() != self.weight[lo].data_ptr() or b.weight.untyped_storage().data_ptr() != \
                    self.weight.untyped_storage().data_ptr():
                return False
            if self.bias is not None and (b.bias is None or b.bias.data_ptr() != self.bias[lo:].data_ptr()):
                return False
        return True

    def sync_adapters(self) -> tuple:
        """Bring the packed LoRA copies up to date (see ``PackedLoRA``): refreshed in place when the
        adapters are the ones packed before, built anew (new addresses, ``layout`` + 1) when they
        changed; left as they are while the adapters cannot be packed (several, disabled, dropout
        active: calls then read the peft modules). -> (layout, signature of the active adapters):
        what a CUDA graph captured now depends on."""
        terms = [_lora_terms(m) for m in self.modules]
        if not _single_adapter_terms(terms):
            return self.layout, tuple(tuple(len(t) for t in terms))
        signature = _terms_signature(terms)
        if self.packed is not None and self.packed.signature == signature:
            self.packed.refresh()
        else:
            self.packed = PackedLoRA(terms, self.splits, self.weight.shape[1])
            self.layout += 1
        return self.layout, signature

    def __call__(self, x: torch.Tensor, pack: bool = True) -> list[torch.Tensor]:
        """x [..., in] -> one output per member, [..., out_i] each (base + active LoRA deltas).
        ``pack``: use the packed copies where there are some and the adapters allow it (their
        values are those of the last ``sync_adapters``)."""
        y = F.linear(x, self.weight, self.bias)
        terms = [_lora_terms(m) for m in self.modules]
        if any(terms):
            dtype = y.dtype
            if pack and self.packed is not None and _single_adapter_terms(terms):
                y = (y + self.packed.delta(self.modules[0], x)).to(dtype)
                return list(y.split(self.splits, dim=-1))
            deltas = []
            if _single_adapter_terms(terms):  # unpacked: one A GEMM over a per-call cat of the A matrices
                a_w = torch.cat([t[0][0].weight for t in terms])
                a = F.linear(_lora_input(self.modules[0], x, a_w.dtype), a_w)
                lo = 0
                for (A, B, _, s) in (t[0] for t in terms):
                    r = A.weight.shape[0]
                    deltas.append(B(a[..., lo:lo + r]) * s)
                    lo += r
            else:
                for m, t, n in zip(self.modules, terms, self.splits):
                    d = None
                    for (A, B, drop, s) in t:
                        term = B(A(drop(_lora_input(m, x, A.weight.dtype)))) * s
                        d = term if d is None else d + term
                    deltas.append(d if d is not None else y.new_zeros(*y.shape[:-1], n))
            y = (y + torch.cat(deltas, dim=-1)).to(dtype)
        return list(y.split(self.splits, dim=-1))


class FusedProjections:
    """Per layer: q/k/v as one ``FusedLinear`` and the MLP's gate/up as another (see ``fuse_projections``)."""

    def __init__(self, layers):
        self.qkv, self.gate_up = [], []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj]))
            self.gate_up.append(FusedLinear([mlp.gate_proj, mlp.up_proj]))

    def is_intact(self) -> bool:
        return all(f.is_intact() for f in (*self.qkv, *self.gate_up))

    def sync_adapters(self) -> tuple:
        """``FusedLinear.sync_adapters`` for every group -> their states, one tuple."""
        return tuple(f.sync_adapters() for f in (*self.qkv, *self.gate_up))

    def check(self) -> None:
        if not self.is_intact():
            raise RuntimeError("the model's q/k/v or gate/up parameters no longer lie in the engine's fused "
                               "weights (the model was moved, cast or a parameter was replaced): build a new "
                               "engine (or decoder)")


def fuse_projections(model) -> FusedProjections:
    """Fuse ``model``'s q/k/v and gate/up weights in place (see ``FusedLinear``); idempotent: a model
    fused before (and still intact) returns the same object. Zero extra weight memory once the old
    per-projection tensors are freed (they are, unless something else holds them)."""
    causal_lm = causal_lm_of(model)
    inner = causal_lm.model
    fused = getattr(causal_lm, "_compilepass_fused", None)
    if isinstance(fused, FusedProjections) and fused.is_intact():
        return fused
    fused = FusedProjections(inner.layers)
    object.__setattr__(causal_lm, "_compilepass_fused", fused)  # not a submodule, not in state_dict
    return fused

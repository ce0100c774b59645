"""Fused projections: q/k/v and gate/up as one GEMM each, over fused weight tensors that the model's
own parameters are re-pointed into (still one copy of the weights). LoRA deltas are read from the
peft modules at every call, so generation sees the adapter's current weights."""

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

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [..., in] -> one output per member, [..., out_i] each (base + active LoRA deltas)."""
        y = F.linear(x, self.weight, self.bias)
        terms = [_lora_terms(m) for m in self.modules]
        if any(terms):
            dtype = y.dtype
            deltas = []
            single = all(len(t) == 1 for t in terms) and len({t[0][0].weight.dtype for t in terms}) == 1 and all(
                isinstance(t[0][2], torch.nn.Identity) or not t[0][2].training for t in terms)
            if single:  # one GEMM for every member's A: a per-call cat of the small A matrices
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

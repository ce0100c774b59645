"""One copy of the weights: the trainer's base parameters re-bound to views of vLLM's tensors.

q/k/v are row slices of vLLM's fused ``qkv_proj``, gate/up of ``gate_up_proj``, the embedding (and an
untied ``lm_head``) the first ``vocab_size`` rows of vLLM's padded one, everything else the same tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from compilepass.core.shapes import causal_lm_of


def _strip(name: str, markers: Sequence[str] = (".base_layer",)) -> str:
    for m in markers:
        name = name.replace(m, "")
    return name


def base_params(causal_lm) -> dict[str, tuple[torch.nn.Module, str, torch.Tensor]]:
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


def packed_groups(vllm_model) -> dict[str, list[str]]:
    mapping = dict(getattr(vllm_model, "packed_modules_mapping", None) or {})
    return mapping or {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _views_for(causal_lm, vllm_model) -> dict[str, torch.Tensor]:
    """``{clean HF parameter name: view of vLLM's tensor}`` for every base parameter; raises when one
    has no counterpart of a matching shape and dtype."""
    hf = base_params(causal_lm)
    vp = _vllm_params(vllm_model)
    packed = packed_groups(vllm_model)
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
    causal_lm = causal_lm_of(model)
    hf = base_params(causal_lm)
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
    for name, (_, _, t) in base_params(causal_lm_of(model)).items():
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if not any(a <= lo and hi <= b for a, b in ranges):
            bad.append(name)
    return bad


def write_base_checkpoint(causal_lm, directory: Path) -> None:
    """config.json + model.safetensors of the base weights (peft wrappers and LoRA tensors left out)."""
    from safetensors.torch import save_file

    tensors = {}
    tied = bool(getattr(causal_lm.config, "tie_word_embeddings", False))
    for name, (_, _, t) in base_params(causal_lm).items():
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = t.detach().to("cpu").contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = causal_lm.config.to_dict()
    if not config.get("architectures"):  # a model built from a config has none; vLLM picks its class by it
        config["architectures"] = [type(causal_lm).__name__]
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))

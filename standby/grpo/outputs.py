"""What a finished GRPO run leaves for use: the final adapter in peft format, and a merged model.

At the end of a run (its last step, ``run.max_steps``) :func:`save_final` writes, as TRL's
``save_model`` does, straight into ``run.output_dir``::

    adapter_model.safetensors, adapter_config.json   # peft: PeftModel.from_pretrained(base, output_dir)
    tokenizer files                                   # the run's tokenizer (not for presets' toy one)
    merged/                                           # run.save_merged=true: a plain transformers model

beside the ``step-*`` checkpoints (which hold the same adapter plus the optimizer state).
Each file is written to a temporary name and renamed into place.

``merged/`` is the base model with the adapter folded in (peft's ``merge_and_unload``), saved
with ``save_pretrained``: ``AutoModelForCausalLM.from_pretrained(output_dir / "merged")`` loads it
without peft. :func:`export_merged` makes the same from a saved adapter later
(``compilepass export-merged RUN_DIR``): the base is the one given, else the run's own (the model
in the run's newest checkpoint's config: a preset is rebuilt with the run's seed and
``model.init_std``), else the adapter's ``base_model_name_or_path``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from compilepass.core.errors import CompilepassError, ConfigError
from compilepass.core.models import build_model
from compilepass.core.shapes import causal_lm_of
from compilepass.standby.grpo.checkpoint import META_FILE, find_latest
from compilepass.standby.grpo.config import ModelConfig

__all__ = ["ExportError", "MERGED_DIR", "base_copy", "export_merged", "merge_into", "save_final"]

MERGED_DIR = "merged"
_TMP_PREFIX = ".tmp-final-"


class ExportError(CompilepassError):
    """A final adapter or merged model that cannot be written or read."""


def _write_dir_into(target: Path, write) -> list[str]:
    """Run ``write(tmp_dir)``, then move each file it wrote into ``target`` (same filesystem,
    ``os.replace``): a file in ``target`` is either the old one or the complete new one."""
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob(_TMP_PREFIX + "*"):  # what a killed earlier save left
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=target))
    try:
        write(tmp)
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in names:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp / name, target / name)
        return names
    except OSError as e:
        raise ExportError(f"cannot write into {str(target)!r}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_tokenizer(tokenizer: Any, directory: Path) -> bool:
    hf = getattr(tokenizer, "hf", None)
    if hf is None or not hasattr(hf, "save_pretrained"):
        return False  # the presets' toy byte tokenizer has no files
    hf.save_pretrained(str(directory))
    return True


def save_final(model, tokenizer, output_dir: str | os.PathLike, *, base_name: Optional[str] = None,
               merged: bool = False) -> dict[str, Optional[str]]:
    """Write the final adapter (peft format) and the tokenizer into ``output_dir``, and with
    ``merged`` the merged model into ``output_dir/merged``. ``base_name`` is recorded as the
    adapter's ``base_model_name_or_path``. Returns ``{"adapter": dir, "merged": dir or None}``."""
    out = Path(output_dir)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        if base_name:
            cfg_path = tmp / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = base_name
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        _save_tokenizer(tokenizer, tmp)

    _write_dir_into(out, write)
    merged_dir = None
    if merged:
        merged_dir = str(merge_into(base_copy(model), out, out / MERGED_DIR, tokenizer=tokenizer))
    return {"adapter": str(out), "merged": merged_dir}


def base_copy(model) -> torch.nn.Module:
    """A CPU copy of ``model``'s base (a peft model's frozen weights, no adapter), as a plain
    transformers model: built from its config, loaded with the base weights. The model itself is
    left untouched (so no merge/unmerge round trip changes its weights)."""
    from transformers import AutoModelForCausalLM

    lm = causal_lm_of(model)
    dtype = next(lm.parameters()).dtype
    with torch.device("cpu"):
        fresh = AutoModelForCausalLM.from_config(lm.config, dtype=dtype)
    state = {}
    for key, value in lm.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().to("cpu", copy=True)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ExportError(f"the base weights do not match a fresh {type(fresh).__name__}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return fresh.eval()


def merge_into(base, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Load the peft adapter in ``adapter_dir`` onto ``base``, ``merge_and_unload``, and save the
    result with ``save_pretrained`` (plus the tokenizer) into ``out_dir``. ``base`` is consumed."""
    from peft import PeftModel

    out = Path(out_dir)
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load the adapter in {str(adapter_dir)!r}: {str(e).splitlines()[0]}") from None
    merged = peft_model.merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(str(tmp))
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        else:  # the adapter directory's tokenizer, when it holds one
            _copy_tokenizer_files(Path(adapter_dir), tmp)

    _write_dir_into(out, write)
    return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _run_base(adapter_dir: Path):
    """The base model a run directory's adapter was trained on, rebuilt from the config in its
    newest checkpoint's meta.json; None when ``adapter_dir`` holds no checkpoint."""
    latest = find_latest(adapter_dir)
    if latest is None or not (latest / META_FILE).is_file():
        return None
    config = json.loads((latest / META_FILE).read_text()).get("config", {})
    raw = dict(config.get("model", {}))
    names = set(ModelConfig.__dataclass_fields__)
    mc = ModelConfig(**{k: v for k, v in raw.items() if k in names})
    if mc.name_or_path.startswith("<object"):
        raise ConfigError(f"the run in {str(adapter_dir)!r} trained a model object: pass its base (base=...)")
    seed = int(config.get("run", {}).get("seed", 0))
    base = build_model(mc.name_or_path, dtype=mc.torch_dtype, device="cpu", seed=seed, cache_dir=mc.cache_dir)
    mc.reinit_preset_weights(base, seed=seed)
    return base


def export_merged(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                  base: Any = None, dtype: Optional[str] = None) -> Path:
    """Merge the peft adapter in ``adapter_dir`` (a run's ``output_dir`` or any adapter
    directory) into its base and save a plain transformers model in ``out_dir`` (default
    ``adapter_dir/merged``); returns ``out_dir``.

    ``base``: a model object, or a preset / directory / cached Hub id; None: the run's own base
    (see the module docstring), else the adapter's ``base_model_name_or_path``. ``dtype``
    (float32 / bfloat16 / float16) when the base is loaded here: default the run's, else float32."""
    adir = Path(adapter_dir)
    if not (adir / "adapter_config.json").is_file():
        raise ExportError(f"{str(adir)!r} holds no peft adapter (adapter_config.json); a run writes its final "
                          f"adapter into run.output_dir when it finishes")
    out = Path(out_dir) if out_dir is not None else adir / MERGED_DIR
    torch_dtype = getattr(torch, dtype) if dtype else None
    if base is None:
        base = _run_base(adir)
        if base is None:
            name = json.loads((adir / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not name:
                raise ExportError(f"the adapter in {str(adir)!r} names no base model: pass base=")
            base = name
    if isinstance(base, (str, os.PathLike)):
        base = build_model(str(base), dtype=torch_dtype or torch.float32, device="cpu")
    elif torch_dtype is not None:
        base = base.to(torch_dtype)
    return merge_into(base, adir, out)

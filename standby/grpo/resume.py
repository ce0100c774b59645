"""Whether a run may resume from a checkpoint written under another config: keys that change results
are refused, keys whose change only shifts numerics a little are warned about, the rest are free."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compilepass.core.errors import ConfigError
from compilepass.standby.grpo.checkpoint import META_FILE

log = logging.getLogger(__name__)

#: Config keys that do not change a run's results: a resume may change them freely.
#: (``run.max_steps`` changes the cosine/linear schedule's horizon: a change is warned about.)
_FREE_KEYS = {"run.output_dir", "run.log_every", "run.save_every", "run.keep_last", "run.tensorboard",
              "run.resume", "run.max_steps", "generation.gpu_memory_utilization", "generation.standby"}
#: Config keys whose change is warned about on resume but not refused (numerics differ slightly).
_WARN_KEYS = {"run.max_steps", "run.device", "run.device_memory_gib", "generation.engine", "model.gradient_checkpointing",
              "model.offload_activations", "optim.micro_batch_size"}
RESULT_AFFECTING_KEYS = "every key except " + ", ".join(sorted(_FREE_KEYS | _WARN_KEYS))


def check_resume_config(path: Path, now: dict) -> None:
    """Compare ``now`` (``GRPOConfig.to_dict()``) with the config saved in checkpoint ``path``:
    ConfigError (one line) if a result-affecting key changed; a warning per changed warn-key."""
    try:
        saved = json.loads((path / META_FILE).read_text()).get("config")
    except (OSError, ValueError):
        saved = None
    if not saved:
        log.warning("checkpoint %s holds no config; cannot check that it matches this run", path)
        return
    refused, warned = [], []
    for section, values in now.items():
        old_sec = saved.get(section) or {}
        for key, value in values.items():
            name = f"{section}.{key}"
            if key not in old_sec or old_sec[key] == value or name in _FREE_KEYS - _WARN_KEYS:
                continue
            (warned if name in _WARN_KEYS else refused).append(f"{name} {old_sec[key]!r} -> {value!r}")
    if refused:
        raise ConfigError(f"cannot resume from {path}: the config changed in keys that change results "
                          f"({'; '.join(refused[:4])}{' ...' if len(refused) > 4 else ''}); restore them or "
                          f"use another run.output_dir")
    for w in warned:
        log.warning("resuming %s with a changed config: %s", path, w)

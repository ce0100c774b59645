"""Pieces the benchmark scripts share (imported as a sibling: each script runs as ``python benchmarks/X.py``)."""

from __future__ import annotations

import importlib.metadata


def dist_version(dist: str):
    """The installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def add_rollout_shape_args(p, model: str = "qwen3-0.6b") -> None:
    """``--out`` (required), ``--model``, ``--batch``, ``--prompt-len``, ``--new-tokens``: the rollout
    shape the decode benchmarks share (qwen3-0.6b, batch 32, prompt 128, 256 new tokens)."""
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=model)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)


TRL_CHILD_ENV = {"TRL_EXPERIMENTAL_SILENCE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def run_json_child(cmd: list, out, timeout_s: float, env_extra: dict = TRL_CHILD_ENV) -> dict:
    """Run a benchmark's child process ``cmd`` that writes its row as JSON to ``out``: the row, or
    ``{"error": "out of memory" | "exit N" | "timed out after T s", "stderr_tail": ...}``."""
    import json
    import os
    import subprocess
    from pathlib import Path

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ, **env_extra))
    except subprocess.TimeoutExpired as e:  # what the child had printed says where it was
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"error": f"timed out after {timeout_s} s", "stderr_tail": err[-3000:]}
    if proc.returncode != 0 or not Path(out).exists():
        tail = proc.stderr[-3000:]
        oom = "out of memory" in tail.lower() or "OutOfMemory" in tail
        return {"error": "out of memory" if oom else f"exit {proc.returncode}", "stderr_tail": tail}
    return json.loads(Path(out).read_text())


def result_header(benchmark: str, dists=("torch", "triton", "transformers", "peft", "trl", "vllm")) -> dict:
    """The fields every result JSON starts with: the benchmark, this command, the device, versions."""
    import shlex
    import sys

    import torch

    return {"benchmark": benchmark, "command": " ".join(shlex.quote(a) for a in sys.argv),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": {d: dist_version(d) for d in dists}}

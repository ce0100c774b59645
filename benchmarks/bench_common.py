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

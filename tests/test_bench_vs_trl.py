"""benchmarks/bench_vs_trl.py --smoke: the merge_lora stacks (ours-merged, trl-ours-merged) run a step on the
CPU beside their unmerged twins, each child in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_merged_stacks_run_beside_the_unmerged_ones(tmp_path):
    pytest.importorskip("trl", reason="the TRL stacks need trl (the dev extra)")
    out = tmp_path / "vs.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_vs_trl.py"), "--smoke", "--steps", "2",
                           "--stacks", "ours", "ours-merged", "trl-ours-merged", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for stack in ("ours", "ours-merged", "trl-ours-merged"):
        assert rows[stack].get("error") is None, (stack, rows[stack].get("stderr_tail", "")[-2000:])
        assert len(rows[stack]["step_s"]) == 2 and all(t > 0 for t in rows[stack]["step_s"]), stack
        assert rows[stack]["merge_lora"] is stack.endswith("-merged"), stack  # the engine that generated

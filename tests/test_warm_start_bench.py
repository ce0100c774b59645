"""benchmarks/bench_warm_start.py on the CPU: a cold and a warm start in new processes, the warm one
hitting the FX-graph cache the cold one wrote, both giving the same tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_warm_start_smoke(tmp_path):
    out = tmp_path / "ws.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_warm_start.py"), "--smoke", "--warm", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    cold, warm = r["starts"]
    assert r["same_tokens"] and cold["kind"] == "cold" and warm["kind"] == "warm"
    assert cold["cache"]["fxgraph_miss"] >= 1 and cold["cache"]["fxgraph_hit"] == 0
    assert warm["cache"]["fxgraph_hit"] >= 1 and warm["cache"]["fxgraph_miss"] == 0

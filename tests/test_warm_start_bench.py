"""benchmarks/bench_warm_start.py on the CPU: a cold start, a warm one hitting the FX-graph cache the cold
one wrote, then the persistent compile's first start (it saves) and a warm one that loads: new processes,
all giving the same tokens."""

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
    cold, warm_fx, cold_pc, warm = r["starts"]
    assert r["same_tokens"] and [s["kind"] for s in r["starts"]] == ["cold", "warm_fx", "cold_precompile", "warm"]
    assert cold["cache"]["fxgraph_miss"] >= 1 and cold["cache"]["fxgraph_hit"] == 0
    assert warm_fx["cache"]["fxgraph_hit"] >= 1 and warm_fx["cache"]["fxgraph_miss"] == 0
    assert cold["precompiled"]["loaded"] == warm_fx["precompiled"]["loaded"] == []  # COMPILEPASS_PRECOMPILE=0
    if r["precompile_supported"]:
        assert cold_pc["precompiled"]["compiled"] == ["dyn"] and warm["precompiled"]["loaded"] == ["dyn"]
        assert warm["precompiled"]["compiled"] == [] and warm["cache"]["fxgraph_hit"] == 0  # nothing traced

"""The kernel benchmark's logic, on CPU in its --smoke mode (so that its first run is not on the GPU)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from compilepass.kernels._triton_support import triton_available

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_kernels.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not triton_available(), reason="triton is not importable")
def test_bench_smoke_writes_complete_json(tmp_path):
    bench = _load()
    out = tmp_path / "kb.json"
    bench.main(["--smoke", "--out", str(out), "--only", "48x32x300,64x32x300+dW", "--methods", "pytorch,ours",
                "--repeats", "2"])
    data = json.loads(out.read_text())
    assert data["command"] and data["device"].startswith("cpu") and data["versions"]["torch"]
    assert all(c["ok"] for c in data["correctness"])
    assert [(c["tokens"], c["weight_requires_grad"]) for c in data["cases"]] == [(48, False), (64, True)]
    for case in data["cases"]:
        for name in ("pytorch", "ours"):
            m = case["methods"][name]
            assert m["status"] == "ok", m
            assert len(m["fwd_bwd_ms"]) == 2 and m["fwd_bwd_ms_median"] > 0
            assert len(m["fwd_nograd_ms"]) == 2
        check = case["checks"]["ours_vs_pytorch"]
        # the bf16 baseline rounds logits to bf16; ours does not -> small, nonzero differences
        assert check["loss_rel_diff"] < 2e-2 and check["grad_hidden_rel_max_err"] < 5e-2
        if case["weight_requires_grad"]:
            assert check["grad_weight_rel_max_err"] < 5e-2


def test_bench_records_failures_instead_of_stopping():
    import torch

    bench = _load()

    def boom(inp):
        raise RuntimeError("synthetic failure")

    def oom(inp):
        raise torch.OutOfMemoryError("synthetic oom")

    class Args:
        seq_len, seed, warmup, repeats = 16, 0, 1, 2

    rec = bench.bench_case((32, 16, 50, False), {"pytorch": bench.run_pytorch, "boom": boom, "oom": oom}, Args,
                           torch.device("cpu"), torch.bfloat16, bench.Timer(torch.device("cpu")))
    assert rec["methods"]["pytorch"]["status"] == "ok"
    assert rec["methods"]["boom"]["status"] == "error" and "synthetic failure" in rec["methods"]["boom"]["error"]
    assert "traceback" in rec["methods"]["boom"]
    assert rec["methods"]["oom"]["status"] == "oom"

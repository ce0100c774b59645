"""benchmarks/memory_breakdown.py: the replay of an allocator trace into live bytes per allocation site."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import memory_breakdown as mb  # noqa: E402

GIB = 2**30


def frames(*names):
    return [{"filename": f, "line": i, "name": "fn"} for i, f in enumerate(names)]


MODEL = "/x/site-packages/transformers/models/qwen3/modeling_qwen3.py"
OURS = "/work/main/compilepass/standby/training/logprobs.py"
TORCH = "/x/site-packages/torch/nn/functional.py"


def test_peak_and_oom_count_live_blocks_by_their_site_outside_torch():
    trace = [
        {"action": "alloc", "addr": 1, "size": 4 * GIB, "frames": frames(TORCH, MODEL, OURS)},
        {"action": "alloc", "addr": 2, "size": 1 * GIB, "frames": frames(TORCH, OURS)},
        {"action": "alloc", "addr": 3, "size": 1 * GIB, "frames": frames(TORCH, OURS)},
        {"action": "free_requested", "addr": 2, "size": 1 * GIB},
        {"action": "free_completed", "addr": 2, "size": 1 * GIB},
        {"action": "alloc", "addr": 4, "size": 2 * GIB, "frames": frames(MODEL)},
        {"action": "oom", "size": 3 * GIB, "device_free": GIB // 2, "frames": frames(TORCH, OURS)},
    ]
    r = mb.replay(trace)
    assert r["events"] == 7
    assert r["peak_live_gib"] == 7.0  # blocks 1, 3 and 4 after 2 was freed
    sites = {row["site"]: row for row in r["peak_sites"]}
    assert sites["transformers/models/qwen3/modeling_qwen3.py:1 fn"]["gib"] == 4.0
    assert sites["transformers/models/qwen3/modeling_qwen3.py:0 fn"]["gib"] == 2.0
    assert sites["compilepass/standby/training/logprobs.py:1 fn"]["blocks"] == 1
    assert sites["compilepass/standby/training/logprobs.py:1 fn"]["torch_frame"].startswith("torch/nn/functional.py")
    (oom,) = r["ooms"]
    assert oom["live_gib"] == 7.0 and oom["requested_gib"] == 3.0 and oom["device_free_gib"] == 0.5
    assert oom["at"].startswith("compilepass/standby/training/logprobs.py")


def test_a_trace_without_completions_frees_on_request():
    trace = [{"action": "alloc", "addr": 1, "size": GIB, "frames": frames(OURS)},
             {"action": "free_requested", "addr": 1, "size": GIB},
             {"action": "alloc", "addr": 2, "size": GIB // 2, "frames": frames(OURS)}]
    r = mb.replay(trace)
    assert r["peak_live_gib"] == 1.0
    assert r["peak_sites"][0]["gib"] == 1.0


def test_no_command_is_refused(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        mb.main(["--summary", "/tmp/unused.json"])
    assert e.value.code == 2
    assert "name the compilepass command" in capsys.readouterr().err

"""The standby step-time benchmark's logic, on CPU in its --smoke mode (so that its first run is
not on the GPU): steps alternate standby on / off in pairs, and the JSON holds every step."""

from __future__ import annotations

import importlib.util
import json
import os

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_standby_step.py")


def test_standby_step_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_standby_step", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "step.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    timed = [s for s in data["steps"] if s["timed"]]
    assert len(timed) == 2 * data["pairs"]
    # pairs alternate their order: on/off, then off/on
    assert [s["standby"] for s in timed] == [True, False, False, True][:len(timed)]
    assert data["step_s_standby_on"]["n"] == data["step_s_standby_off"]["n"] == data["pairs"]
    assert data["ratio_on_over_off"]["n"] == data["pairs"] and data["ratio_on_over_off"]["ratio"] > 0
    assert all(s["wall_s"] > 0 and s["completion_len"] > 0 for s in data["steps"])
    assert set(data["ratio_on_over_off_by_phase"]) == {"gen_s", "train_s"}
    assert data["standby_work_s"] >= 0 and 0 <= data["standby_work_fraction_of_step"] < 1
    # every on-step starts asleep and pays its wake; off-steps never wake or sleep inside the step
    assert all(s["wake_s"] > 0 and s["sleep_s"] > 0 for s in timed if s["standby"])
    assert all(s["wake_s"] == 0 and s["sleep_s"] == 0 for s in timed if not s["standby"])
    # both steps of a pair use the same step number (sampling seed) and prompts
    assert [s["step"] for s in timed][0::2] == [s["step"] for s in timed][1::2]

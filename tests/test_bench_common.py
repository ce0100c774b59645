"""benchmarks/bench_common.run_json_child: a child's row, or its failure with what it printed (also
when it is killed for running past its time, so a cut run still says where it was)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import run_json_child  # noqa: E402


def test_row_failure_and_timeout_keep_what_the_child_said(tmp_path):
    out = tmp_path / "row.json"
    ok = run_json_child([sys.executable, "-c", f"import json; json.dump({{'x': 1}}, open({str(out)!r}, 'w'))"],
                        out, 60, env_extra={})
    assert ok == {"x": 1}
    failed = run_json_child([sys.executable, "-c", "import sys; print('at step 3', file=sys.stderr); sys.exit(3)"],
                            tmp_path / "none.json", 60, env_extra={})
    assert failed["error"] == "exit 3" and "at step 3" in failed["stderr_tail"]
    slow = run_json_child([sys.executable, "-c", "import sys, time; print('compiling layer 7', file=sys.stderr, "
                           "flush=True); time.sleep(60)"], tmp_path / "none.json", 3, env_extra={})
    assert slow["error"] == "timed out after 3 s" and "compiling layer 7" in slow["stderr_tail"]
    json.dumps(slow)  # a result file can hold it

"""The one-way layers hold: the import-linter contracts of ``.importlinter`` are kept and no import
cycle exists among compilepass's modules (``.ci/check_layers.py``, run here as CI runs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_layers_contract_kept_and_no_import_cycles():
    proc = subprocess.run([sys.executable, str(REPO / ".ci" / "check_layers.py")], capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "0 broken" in out and " 0 import cycle(s)" in out, out


def test_check_layers_finds_a_cycle_and_an_upward_import(tmp_path):
    """The check can fail: a copy of the tree where the lowest layer imports the database."""
    sys.path.insert(0, str(REPO / ".ci"))
    try:
        import check_layers
    finally:
        sys.path.pop(0)
    root = check_layers.lay_out(tmp_path)
    errors = root / "compilepass" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom compilepass.db.store import load_db  # noqa\n")
    lint, cycles = check_layers.check(root)
    assert lint != 0 and cycles != 0

"""Helpers for tests that run the ``compilepass`` CLI as a user would, in a subprocess."""

import os
import subprocess
import sys


def run_cli(*args, env=None, timeout=120):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "compilepass.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def assert_one_line_error(proc, *needles):
    """Exit code 2, no traceback, exactly one line ``compilepass: error: ...`` holding every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("compilepass: error: ")
    for needle in needles:
        assert needle in lines[0]

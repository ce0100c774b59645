"""The tuner's child processes: one per trial or verification, each in its own session, with fresh
compile caches, a hard timeout, and no way to outlive the tuner.

``run_isolated`` starts ``python -m compilepass.tuning.isolation LIFELINE PARENT MODULE spec.json
result.json`` in ``compilepass-run-<pid>@<host>-<random>/`` under the temp dir. The child runs
``MODULE._child_main(spec.json, result.json)``. Whatever ends it (exit, crash, timeout, an
interrupted or killed tuner), its whole process group goes with it:

- ``prctl`` (Linux): the child gets ``PR_SET_PDEATHSIG`` = SIGKILL between fork and exec, so it dies
  the moment the tuner does, ``kill -9`` included. Its first act is to fork a guard into its process
  group that has SIGTERM as *its* death signal and answers it by killing the group: the compilers
  and compile workers below the child die with it.
- ``watchdog`` (where prctl is missing): a thread in the child waits on its stdin pipe from the
  tuner (and on its parent pid) and kills the group once the tuner is gone.

After the child exits, the tuner kills the group too (stragglers), before reaping the child, so
the group id cannot have been reused. A run directory left by a killed tuner is removed by the next
tuner (:func:`sweep_stale_run_dirs`) once its owner and its child are both gone.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from compilepass.core.atomic import write_json_atomic
from compilepass.core.procs import (die_with_parent, owner_alive, owner_tag, parent_death_signal_available, pid_alive,
                                    set_parent_death_signal)

_TAIL_CHARS = 4000
RUN_PREFIX = "compilepass-run-"
CHILD_PID_FILE = "child.pid"
LIFELINES = ("prctl", "watchdog")
_RUN_DIR = re.compile(re.escape(RUN_PREFIX) + r"(?P<owner>\d+@[A-Za-z0-9_]+)-[a-z0-9_]+")


@dataclass
class IsolatedRun:
    """What a child process left behind: its result payload (if any), how it ended, its output tail."""
    status: Optional[str]  # "timeout" or None (then look at payload / returncode)
    returncode: Optional[int]
    payload: Optional[dict]
    tail: str
    wall_s: float


def default_lifeline() -> str:
    return "prctl" if parent_death_signal_available() else "watchdog"


def run_isolated(module: str, payload: dict, timeout_s: float, extra_env: Optional[dict] = None,
                 keep_dir: Optional[str] = None, lifeline: Optional[str] = None) -> IsolatedRun:
    """Run ``MODULE._child_main(spec.json, result.json)`` in a new session with fresh compile caches.

    Call it from a thread that lives until it returns (the death signal follows the thread)."""
    lifeline = lifeline or default_lifeline()
    if lifeline not in LIFELINES:
        raise ValueError(f"unknown lifeline {lifeline!r}; one of {', '.join(LIFELINES)}")
    work = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{owner_tag()}-"))
    spec_path, result_path, log_path = work / "spec.json", work / "result.json", work / "output.log"
    write_json_atomic(spec_path, payload)
    env = dict(os.environ)
    env.update({k: str(v) for k, v in (extra_env or {}).items()})
    env.update({
        "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
        "TRITON_CACHE_DIR": str(work / "triton"),
        "PYTHONUNBUFFERED": "1",
    })
    # Remote caches would defeat the cold-cache guarantee.
    for key in ("TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE", "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "compilepass.tuning.isolation", lifeline, str(os.getpid()), module,
           str(spec_path), str(result_path)]
    t0 = time.perf_counter()
    try:
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True,
                                    preexec_fn=die_with_parent() if lifeline == "prctl" else None)
            try:
                (work / CHILD_PID_FILE).write_text(str(proc.pid))
                exited = _wait_exit(proc, timeout_s)
                _kill_group(proc)
            except BaseException:
                _kill_group(proc)  # the caller was interrupted: leave no orphaned compile behind
                raise
            finally:
                proc.stdin.close()
        wall = time.perf_counter() - t0
        status, returncode = (None, proc.returncode) if exited else ("timeout", None)
        payload_out = None
        if status is None and result_path.exists():
            payload_out = json.loads(result_path.read_text())
        return IsolatedRun(status, returncode, payload_out, _tail(log_path), wall)
    finally:
        if keep_dir:
            shutil.copytree(work, Path(keep_dir) / work.name, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until the child exits (True) or the timeout passes (False), leaving it unreaped: until
    ``proc.wait()`` its pid, and with it the id of the process group it leads, stays taken."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(0.05, left))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty already
    proc.wait()


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    return data[-_TAIL_CHARS:].decode("utf-8", errors="replace")


def _run_dir_is_stale(path: Path) -> bool:
    m = _RUN_DIR.fullmatch(path.name)
    if m is None or owner_alive(m.group("owner")) or not path.is_dir():
        return False
    try:
        child = int((path / CHILD_PID_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        child = 0
    return not pid_alive(child)


def stale_run_dirs(tmp: Optional[str] = None) -> list[Path]:
    """Run directories under the temp dir whose tuner and child are both gone."""
    try:
        children = list(Path(tmp or tempfile.gettempdir()).iterdir())
    except OSError:
        return []
    return [p for p in children if p.name.startswith(RUN_PREFIX) and _run_dir_is_stale(p)]


def sweep_stale_run_dirs(tmp: Optional[str] = None) -> list[Path]:
    """Remove the run directories of dead tuners; returns what was removed."""
    removed = []
    for path in stale_run_dirs(tmp):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------- in the child


def _end_group(leader: int) -> None:
    """Kill the process group that ``leader`` leads (a child started by hand, outside a session of
    its own, leads none: then only ``leader``), this process included."""
    try:
        if os.getpgrp() == leader:
            os.killpg(leader, signal.SIGKILL)
        else:
            os.kill(leader, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os._exit(1)


def _guard_group() -> None:
    """Fork the guard: a process in this group whose death signal is SIGTERM and whose answer to
    SIGTERM is to kill the group (this process, its compilers, its compile workers, itself)."""
    leader = os.getpid()
    if os.fork():
        return
    try:
        signal.signal(signal.SIGTERM, lambda *_: _end_group(leader))
        if not set_parent_death_signal(signal.SIGTERM, leader):
            while os.getppid() == leader:
                time.sleep(0.5)
            _end_group(leader)
        while True:
            signal.pause()
    finally:
        os._exit(0)


def _watch_parent(parent: int) -> None:
    """A thread that kills this process group once the tuner is gone: its end of the stdin pipe
    closes, or this process is handed to another parent."""
    leader = os.getpid()
    try:
        pipe = stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        pipe = False

    def watch() -> None:
        while os.getppid() == parent:
            if not pipe:
                time.sleep(0.5)
                continue
            ready, _, _ = select.select([0], [], [], 0.5)
            if ready and not os.read(0, 4096):
                break
        _end_group(leader)

    threading.Thread(target=watch, name="compilepass-parent-watch", daemon=True).start()


def _child(argv: list[str]) -> int:
    lifeline, parent, module, *args = argv
    if os.getppid() != int(parent):
        return 1  # the tuner is gone already
    if lifeline == "prctl":
        _guard_group()
    else:
        _watch_parent(int(parent))
    return importlib.import_module(module)._child_main(*args)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))

"""The import rules of compilepass, checked on the package as it is installed.

``kernels/`` and ``standby/`` are mapped into the ``compilepass`` namespace by pyproject.toml, so the
source tree is not the import tree. This lays the import tree out in a temporary directory (copies of
the three folders), then:

1. runs ``lint-imports`` (import-linter) with the contracts in ``.importlinter``;
2. builds the import graph with grimp (import-linter's engine; it sees function-local imports too)
   and fails on any import cycle among compilepass's modules, printing each cycle's modules.

Exit status 0 only if both pass. ``python .ci/check_layers.py`` from the repository root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CYCLES = r"""
import sys
import grimp

graph = grimp.build_graph("compilepass", cache_dir=None)
modules = sorted(graph.modules)
edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
# Tarjan's strongly connected components, iteratively
index, low, on_stack, stack, sccs, counter = {}, {}, set(), [], [], [0]
for root in modules:
    if root in index:
        continue
    work = [(root, iter(edges[root]))]
    index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on_stack.add(root)
    while work:
        node, it = work[-1]
        nxt = next(it, None)
        if nxt is not None:
            if nxt not in index:
                index[nxt] = low[nxt] = counter[0]; counter[0] += 1; stack.append(nxt); on_stack.add(nxt)
                work.append((nxt, iter(edges[nxt])))
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
            continue
        work.pop()
        if work:
            low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
            comp = []
            while True:
                m = stack.pop(); on_stack.discard(m); comp.append(m)
                if m == node:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))
print(f"{len(modules)} modules, {sum(map(len, edges.values()))} imports, {len(sccs)} import cycle(s)")
for comp in sccs:
    print("  cycle among: " + ", ".join(comp))
sys.exit(1 if sccs else 0)
"""


def lay_out(dest: Path) -> Path:
    """``dest/compilepass`` with ``kernels/`` and ``standby/`` in their installed places."""
    pkg = dest / "compilepass"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "compilepass", pkg, ignore=ignore)
    shutil.copytree(REPO / "kernels", pkg / "kernels", ignore=ignore)
    shutil.copytree(REPO / "standby", pkg / "standby", ignore=ignore)
    return dest


def check(root: Path) -> tuple[int, int]:
    """(lint-imports' exit status, the cycle check's) over the tree laid out at ``root``."""
    env = dict(os.environ, PYTHONPATH=str(root))
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    rc_lint = subprocess.run([lint, str(REPO / ".importlinter"), "--no-cache"], cwd=root, env=env).returncode
    rc_cycles = subprocess.run([sys.executable, "-c", CYCLES], cwd=root, env=env).returncode
    return rc_lint, rc_cycles


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="compilepass-layers-") as tmp:
        rc_lint, rc_cycles = check(lay_out(Path(tmp)))
    return 1 if rc_lint or rc_cycles else 0


if __name__ == "__main__":
    sys.exit(main())

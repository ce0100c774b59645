"""The repository's ``kernels/`` folder (installed as ``compilepass.kernels``) never stands in for the
Hugging Face distribution ``kernels`` when the repository root is on sys.path: ``python -m pytest`` or
``python -m compilepass.cli`` from a checkout, where transformers >= 5.25 imports ``kernels``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = "import kernels, compilepass.kernels as ours; print(kernels.__file__); print(ours.grpo_loss.__module__)"


def _python_in_repo_root(code: str, *args: str, path: list[Path] = ()) -> subprocess.CompletedProcess:
    """``python -c code args`` run in the repository root, with the root first on PYTHONPATH (where
    ``python -m`` puts it), then ``path`` (stand-ins for site-packages)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *map(str, path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_installed_kernels_distribution_wins_over_the_repo_folder(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = object\n")
    proc = _python_in_repo_root(PROBE, path=[site])
    assert proc.returncode == 0, proc.stderr
    imported, ours = proc.stdout.split()
    assert Path(imported) == site / "kernels" / "__init__.py"
    assert ours == "compilepass.kernels.dispatch"


def test_without_a_kernels_distribution_the_top_level_name_is_an_empty_module(tmp_path):
    """Nothing else named ``kernels`` on the path: ``import kernels`` gives an empty module (none of ours,
    no ``__version__``), so transformers' availability check, which imports a ``kernels`` without
    distribution metadata, finds no version and skips it; transformers still imports."""
    code = ("import sys\n"
            "sys.path[:] = [p for p in sys.path if 'site-packages' not in p] + [sys.argv[1]]\n"
            "import kernels\n"
            "print(kernels.__file__, hasattr(kernels, 'grpo_loss'), hasattr(kernels, '__version__'))\n")
    # site-packages dropped, then only an empty folder appended: the repo folder is the only `kernels`.
    proc = _python_in_repo_root(code, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(REPO / "kernels" / "__init__.py"), "False", "False"]


def test_transformers_imports_from_the_repo_root():
    """What failed in CI: a model class imported in the repository root (with an installed ``kernels``
    shadowed, transformers 5.25; with a ``kernels`` that raised, transformers 5.19)."""
    proc = _python_in_repo_root("import transformers; transformers.LlamaConfig; print('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]

"""The tuner: workloads that run the engines, isolated trials, side-by-side verification, the Optuna search.

``Tuner(TuneConfig(...)).run()`` (:mod:`~compilepass.tuning.search`) is the Python API under
``compilepass tune``; below it :func:`~compilepass.tuning.trial.run_trial` (one isolated measurement)
and :func:`~compilepass.tuning.verify.verify` (defaults against candidates, interleaved, one process),
both in child processes that die with the tuner (:mod:`~compilepass.tuning.isolation`).
"""

from compilepass.tuning.search import TuneConfig, Tuner, TuneResult

__all__ = ["Tuner", "TuneConfig", "TuneResult"]

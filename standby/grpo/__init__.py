"""The GRPO runtime: config, trainer, data, rewards, checkpoints, metrics.

``run_grpo(config)`` / ``GRPOTrainer(config).train()`` (:mod:`~compilepass.standby.grpo.trainer`) is
the Python API under ``compilepass grpo``; ``load_config`` / ``default_config``
(:mod:`~compilepass.standby.grpo.config`) build its config, or ``GRPOArguments``
(:mod:`~compilepass.standby.grpo.trl_args`) under TRL's flat names; ``export_merged``
(:mod:`~compilepass.standby.grpo.outputs`) merges a finished run's adapter into its base.
"""

from compilepass.standby.grpo.config import GRPOConfig, default_config, load_config
from compilepass.standby.grpo.outputs import export_merged
from compilepass.standby.grpo.trainer import (GRPOSummary, GRPOTrainer, TrainingInterrupted, TrainingOutOfMemoryError,
                                              run_grpo, step_seed)
from compilepass.standby.grpo.trl_args import GRPOArguments

__all__ = ["GRPOArguments", "GRPOConfig", "GRPOSummary", "GRPOTrainer", "TrainingInterrupted",
           "TrainingOutOfMemoryError", "default_config", "export_merged", "load_config", "run_grpo", "step_seed"]

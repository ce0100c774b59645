"""compilepass: GRPO on one GPU with standby KV memory, tuned torch.compile flags and logit-free loss kernels."""

__version__ = "0.1.0"

from compilepass.selection import (compile, select,  # noqa: E402  (note: rebinds the name `select`)
                                   vllm_compilation_config)

__all__ = ["__version__", "compile", "select", "vllm_compilation_config", "GRPOArguments", "GRPOTrainer"]


def __getattr__(name: str):
    """``compilepass.GRPOArguments`` / ``compilepass.GRPOTrainer`` (TRL's shape, our runtime), imported
    on first use so that ``import compilepass`` stays free of torch."""
    if name == "GRPOArguments":
        from compilepass.standby.grpo.trl_args import GRPOArguments

        return GRPOArguments
    if name == "GRPOTrainer":
        from compilepass.standby.grpo.trainer import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(f"module 'compilepass' has no attribute {name!r}")

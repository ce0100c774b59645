"""compilepass: GRPO on one GPU with standby KV memory, tuned torch.compile flags and logit-free loss kernels."""

__version__ = "0.1.0"

from .select import compile, select, vllm_compilation_config  # noqa: E402  (note: rebinds the name `select`)

__all__ = ["__version__", "compile", "select", "vllm_compilation_config"]

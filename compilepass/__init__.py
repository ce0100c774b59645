"""compilepass: GRPO on one GPU with standby KV memory, tuned torch.compile flags and logit-free loss kernels."""

__version__ = "0.1.0"

from compilepass.selection import (compile, select,  # noqa: E402  (note: rebinds the name `select`)
                                   vllm_compilation_config)

__all__ = ["__version__", "compile", "select", "vllm_compilation_config"]

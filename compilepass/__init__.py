"""compilepass: GRPO on one GPU with standby KV memory, tuned torch.compile flags and logit-free loss kernels."""

__version__ = "0.1.0"

"""Triton kernels that never materialize logits, each beside its PyTorch reference."""

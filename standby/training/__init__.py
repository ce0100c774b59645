"""The training side of a GRPO step: log-probs from hidden states, the loss of a micro-batch, the
automatic micro-batch, gradient checkpointing, tiled MLPs, LoRA mixed precision, activation offload.
Each module is usable on its own (``compilepass bench context`` and the trainer both use them)."""

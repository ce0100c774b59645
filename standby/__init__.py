"""Standby memory, the native rollout engine, the vLLM engine and the GRPO runtime."""

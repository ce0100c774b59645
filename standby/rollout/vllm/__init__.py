"""The vLLM rollout engine: vLLM in this process, generating on the trainer's own weight tensors.

- :mod:`~compilepass.standby.rollout.vllm.gates`: which vLLM builds are accepted, and why not;
- :mod:`~compilepass.standby.rollout.vllm.weights`: the trainer's base weights as views of vLLM's;
- :mod:`~compilepass.standby.rollout.vllm.lora`: the adapter copied into vLLM's LoRA buffers;
- :mod:`~compilepass.standby.rollout.vllm.internals`: reaching into an in-process vLLM;
- :mod:`~compilepass.standby.rollout.vllm.engine`: :class:`VllmEngine`.

Importing this package (or :mod:`~compilepass.standby.rollout.vllm.gates`) imports neither vLLM nor torch:
the gates run before anything heavy, and the tuner's parent process uses them. Building an engine
imports both.
"""

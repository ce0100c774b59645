"""Rollout: generating completions with the trainer's own weights.

- :mod:`~compilepass.standby.rollout.engine`: the native engine (:class:`RolloutEngine`): one generate
  loop over a static KV cache in a standby region, a compiled decode step, CUDA graphs;
- :mod:`~compilepass.standby.rollout.backend`: what every engine provides (``RolloutBackend``),
  ``SamplingParams``, ``RolloutOutput``, the argument checks both engines make;
- :mod:`~compilepass.standby.rollout.sampling`: choosing the next token and recording its column;
- :mod:`~compilepass.standby.rollout.capture`: the one CUDA-graph capture helper;
- :mod:`~compilepass.standby.rollout.compile`: which options, and what gets compiled;
- :mod:`~compilepass.standby.rollout.kv_cache`: the KV cache's layout in the standby region;
- :mod:`~compilepass.standby.rollout.decode`: the gpt-fast-style decoder over the model's modules;
- :mod:`~compilepass.standby.rollout.fused`: fused q/k/v and gate/up projections;
- :mod:`~compilepass.standby.rollout.kv_plan`: how many sequences fit in the KV budget;
- :mod:`~compilepass.standby.rollout.vllm`: the vLLM engine.
"""

"""The ``rollout`` workload through vLLM (``compilepass tune --engine vllm``).

Each flag set gets its own :class:`~compilepass.standby.rollout.vllm.engine.VllmEngine` (vLLM in this
process, the flags as ``compilation_config["inductor_compile_config"]``), so the trial's compile
time is vLLM's whole engine start: model load, ``torch.compile`` of the model (Dynamo + Inductor),
warm-up and, on CUDA, CUDA-graph capture. Throughput is vLLM's greedy generation of
``batch`` x ``new_tokens`` tokens after ``prompt_len`` random prompt tokens (EOS ignored, so every
unit does the same work).

Honesty of the measurement, on top of the trial machinery's (own process, fresh Inductor/Triton
cache directories, timeout): vLLM's own compile cache is switched off
(``VLLM_DISABLE_COMPILE_CACHE=1``), so every engine compiles cold and Inductor's cache counters see
the miss. The workload runs without a LoRA adapter: vLLM's CPU backend runs LoRA models eagerly,
so flags would not apply there.

Several engines may live in one process (the side-by-side verification builds one per variant):
the model's base parameters are re-bound to the newest engine's weights each time (equal values);
the older engines keep theirs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from compilepass.core.errors import ConfigError
from compilepass.core.shapes import ModelShape, shape_for
from compilepass.standby.rollout.vllm.gates import check_vllm, cpu_head_size_error
from compilepass.tuning.workload_base import Runner, Workload

#: Set while the workload runs: every engine compiles without vLLM's compile cache.
VLLM_COMPILE_CACHE_ENV = "VLLM_DISABLE_COMPILE_CACHE"


def preflight(spec) -> None:
    """User errors before any study or trial: vLLM missing or refused (VllmUnsupportedError), or a
    model whose head size vLLM's CPU attention cannot run (ConfigError)."""

    check_vllm()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        problem = cpu_head_size_error(shape_for(spec.model).head_dim)
        if problem:
            raise ConfigError(problem)


class VllmRolloutWorkload(Workload):
    """Batched greedy generation with vLLM over the model, one engine per flag set."""
    def prepare(self) -> None:
        import torch

        from compilepass.core.models import build_model  # torch, transformers: in the trial process only
        from compilepass.standby.rollout.vllm.weights import write_base_checkpoint  # torch

        check_vllm()
        os.environ[VLLM_COMPILE_CACHE_ENV] = "1"
        s = self.spec
        self.device = s.resolved_device()
        dtype = s.resolved_dtype()
        self.model = build_model(s.model, dtype=dtype, device=self.device, seed=s.seed)
        self.shape = ModelShape.from_hf_config(self.model.config)
        # Inside the trial's work directory when there is one (removed with it), else a temporary one.
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        parent = Path(cache).parent if cache and Path(cache).parent.is_dir() else None
        self._dir = Path(tempfile.mkdtemp(prefix="compilepass-vllm-workload-", dir=parent))
        write_base_checkpoint(self.model, self._dir)  # every engine loads the same weights from here
        g = torch.Generator(device="cpu").manual_seed(s.seed)
        self.prompts = torch.randint(0, self.shape.vocab_size, (s.batch, s.prompt_len), generator=g).tolist()
        self.engines: list = []

    def runner(self, options: Optional[dict]) -> Runner:
        from compilepass.standby.rollout.vllm.engine import VllmEngine  # torch; vLLM when built

        s = self.spec
        engine = VllmEngine(self.model, max_batch=s.batch, max_len=s.prompt_len + s.new_tokens,
                            compile_options=dict(options or {}), model_path=self._dir, seed=s.seed,
                            sleep_mode=False)
        self.engines.append(engine)

        def step():
            engine.generate(self.prompts, max_new_tokens=2, temperature=0.0)

        def unit() -> int:
            out = engine.generate(self.prompts, max_new_tokens=s.new_tokens, temperature=0.0)
            return int(out.completion_lengths.sum())

        return Runner(step, unit, self.device, n_first_calls=1)

    def describe(self) -> dict:
        from dataclasses import asdict

        engine = self.engines[-1] if self.engines else None
        return {"model_shape": asdict(self.shape), "max_len": self.spec.prompt_len + self.spec.new_tokens,
                "engine": "vllm", "vllm": engine.vllm_version if engine else None,
                "engine_init_s": engine.init_s if engine else None}

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
        self.engines.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

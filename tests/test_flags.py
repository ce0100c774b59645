import pytest

from compilepass.core.env import EnvironmentKey
from compilepass.core.errors import UnknownFlagError
from compilepass.flags import KNOWN_BAD, REGISTRY, FlagGate, FlagSpace, inductor_options, parse_flag_assignments


def env(torch="2.11.0", triton="3.6.0", vllm=None, device="cuda"):
    return EnvironmentKey(torch=torch, triton=triton, vllm=vllm, transformers="5.17.0", cuda="13.0" if device == "cuda" else None,
                          device_name="NVIDIA H100 80GB HBM3" if device == "cuda" else "cpu:x86_64",
                          compute_capability="9.0" if device == "cuda" else None, python="3.12.0")


def test_registry_has_the_required_options():
    names = {s.name for s in REGISTRY}
    for required in ("combo_kernels", "benchmark_combo_kernel", "triton.multi_kernel", "coordinate_descent_tuning",
                     "max_autotune", "max_autotune_pointwise", "max_autotune_gemm", "epilogue_fusion",
                     "aggressive_fusion", "shape_padding", "triton.cudagraphs", "size_asserts", "split_reductions"):
        assert required in names


def test_space_checks_against_running_torch():
    space = FlagSpace(device_kind="cuda", env=env())
    real = inductor_options()
    for name in space.names:
        assert name in real
        assert space.defaults()[name] == real[name]


def test_options_missing_from_torch_are_excluded_with_reason():
    fake = {k: v for k, v in inductor_options().items() if k != "combo_kernels"}
    space = FlagSpace(device_kind="cuda", env=env(), inductor_config=fake)
    assert "combo_kernels" not in space.names
    assert "no such Inductor option" in space.excluded["combo_kernels"]
    assert "triton.multi_kernel" in space.names


def test_cpu_space_leaves_out_triton_only_options():
    space = FlagSpace(device_kind="cpu", env=env(device="cpu"))
    assert "triton.cudagraphs" not in space.names and "combo_kernels" not in space.names
    assert "epilogue_fusion" in space.names
    assert space.excluded["combo_kernels"] == "no effect on cpu"


def test_unknown_flag_lists_valid_ones():
    space = FlagSpace(device_kind="cuda", env=env())
    with pytest.raises(UnknownFlagError) as e:
        space.validate({"combo_kernel": True})
    assert "combo_kernel'" in str(e.value) and "combo_kernels" in str(e.value) and "triton.multi_kernel" in str(e.value)
    with pytest.raises(UnknownFlagError):
        FlagSpace(device_kind="cuda", env=env(), include=["not_an_option"])


def test_wrong_value_type_rejected():
    space = FlagSpace(device_kind="cuda", env=env())
    with pytest.raises(UnknownFlagError, match="takes a bool"):
        space.validate({"combo_kernels": 1})
    assert space.validate({"combo_kernels": True, "triton.multi_kernel": 1}) == {"combo_kernels": True,
                                                                              "triton.multi_kernel": 1}


def test_version_gates_follow_simulated_versions():
    flags = {"triton.multi_kernel": 1, "cpp_wrapper": True}
    old = FlagSpace(device_kind="cuda", env=env(torch="2.2.1"))
    new = FlagSpace(device_kind="cuda", env=env(torch="2.11.0+cu130"))
    assert [g.source for g in old.violations(flags)] == ["https://github.com/pytorch/pytorch/pull/117813"]
    assert new.violations(flags) == []
    kept, dropped = old.filter_unsafe(flags)
    assert kept == {} and set(dropped) == {"triton.multi_kernel", "cpp_wrapper"}
    assert new.filter_unsafe(flags) == (flags, {})


def test_vllm_gates_apply_only_to_the_vllm_engine_and_versions():
    flags = {"triton.cudagraphs": True}
    native = FlagSpace(device_kind="cuda", env=env(vllm="0.12.0"))
    vllm_new = FlagSpace(device_kind="cuda", env=env(vllm="0.12.0"), engine="vllm")
    vllm_old = FlagSpace(device_kind="cuda", env=env(vllm="0.10.1"), engine="vllm")
    assert native.violations(flags) == []
    assert len(vllm_new.violations(flags)) == 1
    assert vllm_old.violations(flags) == []
    # multi_kernel is gated for every vLLM version
    assert vllm_old.violations({"triton.multi_kernel": 1})


def test_device_gate_and_prerelease_versions():
    cpu = FlagSpace(device_kind="cpu", env=env(torch="2.13.0.dev20260101+cpu", device="cpu"))
    assert cpu.violations({"combo_kernels": True})
    gate = FlagGate(when={"max_autotune": True}, reason="r", source="s", torch=">=2.10,<2.12")
    assert gate.applies({"max_autotune": True}, env(torch="2.11.0a0+git123"))
    assert not gate.applies({"max_autotune": True}, env(torch="2.12.0"))
    assert not gate.applies({"max_autotune": False}, env(torch="2.11.0"))


def test_every_gate_has_reason_and_source():
    for gate in KNOWN_BAD:
        assert gate.reason and gate.source and gate.when


def test_effective_drops_defaults_and_inactive_dependents():
    space = FlagSpace(device_kind="cuda", env=env())
    d = space.defaults()
    flags = dict(d, combo_kernels=False, benchmark_combo_kernel=True, coordinate_descent_tuning=True)
    assert space.effective(flags) == {"coordinate_descent_tuning": True}
    flags["combo_kernels"] = True
    assert space.effective(flags) == {"combo_kernels": True, "benchmark_combo_kernel": True,
                                      "coordinate_descent_tuning": True}


def test_parse_flag_assignments():
    assert parse_flag_assignments(["combo_kernels=true", "triton.multi_kernel=1", "x=abc"]) == {
        "combo_kernels": True, "triton.multi_kernel": 1, "x": "abc"}
    with pytest.raises(UnknownFlagError):
        parse_flag_assignments(["combo_kernels"])

"""User errors end with one clear line and a non-zero exit, never a traceback."""

import json
import os

import pytest

from cli_helpers import assert_one_line_error, run_cli


def test_missing_model_path(tmp_path):
    proc = run_cli("tune", "--model", str(tmp_path / "no-such-model"), env={"COMPILEPASS_CACHE_DIR": str(tmp_path)})
    assert_one_line_error(proc, "no-such-model", "neither a preset", "qwen3-0.6b")


def test_unknown_preset(tmp_path):
    proc = run_cli("tune", "--model", "qwen9-1t", env={"COMPILEPASS_CACHE_DIR": str(tmp_path)})
    assert_one_line_error(proc, "qwen9-1t", "tiny")


def test_unknown_flag(tmp_path):
    proc = run_cli("tune", "--model", "tiny", "--flags", "epilogue_fusion", "not_a_flag",
                   "--storage", f"sqlite:///{tmp_path}/s.db")
    assert_one_line_error(proc, "not_a_flag", "valid flags", "epilogue_fusion")


@pytest.mark.parametrize("url", ["sqlite:////nonexistent-dir/sub/study.db", "postgresql://nobody@127.0.0.1:1/none",
                                 "notascheme://x"])
def test_unreachable_storage(tmp_path, url):
    proc = run_cli("tune", "--model", "tiny", "--storage", url)
    assert_one_line_error(proc, "storage")


def test_unwritable_cache_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    target = ro / "cache"
    env = {"COMPILEPASS_CACHE_DIR": str(target)}
    if os.geteuid() == 0:  # root ignores permission bits: use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        env = {"COMPILEPASS_CACHE_DIR": str(blocker / "cache")}
    proc = run_cli("tune", "--model", "tiny", env=env)
    assert_one_line_error(proc, "not writable", "COMPILEPASS_CACHE_DIR")


def test_bad_numbers():
    proc = run_cli("tune", "--model", "tiny", "--trials", "0")
    assert_one_line_error(proc, "--trials")


def test_info_lists_environment_and_options():
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["environment"]["torch"]
    names = {f["name"] for f in data["flags"]}
    assert "combo_kernels" in names and "triton.multi_kernel" in names
    by_name = {f["name"]: f for f in data["flags"]}
    if data["device_kind"] == "cpu":
        assert by_name["triton.cudagraphs"]["available"] is False
    human = run_cli("info")
    assert human.returncode == 0 and "torch" in human.stdout

"""The device-memory cap: an N GiB card on a larger one (free memory, the allocator and the reported
total all see N GiB), refused with one line where it cannot apply."""

from __future__ import annotations

import pytest
import torch

from compilepass.standby.memory import DeviceMemoryCap, StandbyError, free_device_memory

GiB = 1 << 30
CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("bad", [0, -3, "lots"])
def test_cap_refuses_nonpositive_or_non_numbers(bad):
    with pytest.raises(StandbyError, match="device-memory cap must be"):
        DeviceMemoryCap(bad)


@pytest.mark.skipif(CUDA, reason="checks the message given where CUDA is missing")
def test_cap_without_cuda_is_one_clear_error():
    with pytest.raises(StandbyError, match="needs a CUDA device"):
        DeviceMemoryCap(80)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cap_makes_the_card_look_n_gib():
    torch.cuda.empty_cache()
    free0, total0 = torch.cuda.mem_get_info()
    used0 = total0 - free0
    n = min(8.0, (total0 - 2 * GiB) / GiB)  # small enough for any test GPU, smaller than the card
    with DeviceMemoryCap(n) as cap:
        free, total = free_device_memory()
        assert abs(total - n * GiB) <= 2 * (1 << 20), (total, n)  # the held region is granule-rounded
        assert total == cap.visible_total
        # free: the N GiB minus what was in use before the cap (the context, other processes)
        assert abs(free - (n * GiB - used0)) <= 64 * (1 << 20), (free / GiB, n, used0 / GiB)
        assert torch.cuda.mem_get_info()[0] == pytest.approx(free, abs=64 * (1 << 20))
        # the allocator fails where an N GiB card's would
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(free + GiB), dtype=torch.uint8, device="cuda")
        fits = torch.empty(int(free * 0.5), dtype=torch.uint8, device="cuda")
        del fits
        torch.cuda.empty_cache()
        d = cap.describe()
        assert d["device_memory_cap_gib"] == n and d["held_gib"] > 0
    free_after, total_after = free_device_memory()
    assert total_after == total0 and free_after >= free0 - 64 * (1 << 20)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cap_above_the_card_caps_nothing_and_too_little_free_is_refused():
    _, total = torch.cuda.mem_get_info()
    with DeviceMemoryCap(total / GiB + 1) as cap:
        assert cap.held_bytes == 0 and free_device_memory()[1] == total
    hog = torch.empty(int(2 * GiB), dtype=torch.uint8, device="cuda")  # in use before the cap
    try:
        with pytest.raises(StandbyError, match="take the cap before loading anything"):
            DeviceMemoryCap(1.0)  # would hold total - 1 GiB, more than is free
    finally:
        del hog
        torch.cuda.empty_cache()


def test_grpo_and_bench_context_take_the_cap_and_refuse_it_without_cuda(tmp_path):
    from cli_helpers import assert_one_line_error, run_cli

    from compilepass.core.errors import ConfigError
    from compilepass.standby.grpo import default_config, load_config

    assert load_config(None, ["run.device_memory_gib=80"], base=default_config("tiny")).run.device_memory_gib == 80.0
    with pytest.raises(ConfigError, match="run.device_memory_gib"):
        load_config(None, ["run.device_memory_gib=0"], base=default_config("tiny"))
    if CUDA:
        return
    proc = run_cli("grpo", "--preset", "tiny", "--no-progress", "run.device_memory_gib=80",
                   f"run.output_dir={tmp_path / 'run'}", timeout=300)
    assert_one_line_error(proc, "run.device_memory_gib caps a CUDA device")
    proc = run_cli("bench", "context", "--model", "tiny", "--allow-cpu", "--min-len", "4", "--max-len", "4",
                   "--device-memory-gib", "80", timeout=300)
    assert_one_line_error(proc, "needs a CUDA device")

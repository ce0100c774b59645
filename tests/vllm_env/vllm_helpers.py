"""Helpers of the vLLM tests: a tiny random-weight Qwen3 (head size 32: vLLM's CPU attention has no
kernel for the presets' 16) and a byte-level tokenizer built locally (no download)."""

from __future__ import annotations

import gc
import sys

import torch

VOCAB = 320  # 256 byte tokens + <eos> + <pad>, padded


def tiny_shape():
    from compilepass.core.shapes import ModelShape

    return ModelShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=128,
                      vocab_size=VOCAB, family="qwen3", tie_word_embeddings=True, max_position_embeddings=512)


def save_byte_tokenizer(directory) -> None:
    """A byte-level BPE tokenizer without merges (id i <-> byte i), plus <eos> = 256 and <pad> = 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {}
    for b in range(256):  # GPT-2's byte -> printable character mapping, in byte order
        byte_to_char[b] = chr(b) if (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255) else None
    n = 0
    for b in range(256):
        if byte_to_char[b] is None:
            byte_to_char[b] = chr(256 + n)
            n += 1
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab["<eos>"], vocab["<pad>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(str(directory))


def build_tiny(seed: int = 0, std: float = 0.15):
    """The tiny model in float32 with weights from N(0, std) (peaked logits, so greedy decoding has
    no near-ties)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_shape().to_hf_config(), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.config.eos_token_id = 256
    model.config.pad_token_id = 257
    return model.eval()


# Where gc.freeze() was called from in this process, from before vLLM is imported: on the H200 (sessions
# 13 and 15) 375 objects were frozen when the first engine was built and again after it, though the
# engine unfreezes the heap after vLLM's two freezes and no gc.freeze() call was seen before the build;
# the gc-heap test prints this record and FREEZE_COUNTS. process_state's own recorder frames are skipped.
FREEZE_SITES: dict = {}
# (moment, gc.get_freeze_count()) from the recorder's installation on: where the count first moves
FREEZE_COUNTS: list = []


def note_freeze_count(moment: str) -> None:
    FREEZE_COUNTS.append((moment, gc.get_freeze_count()))


def record_gc_freezes() -> None:
    """Wrap gc.freeze once for the whole test process, counting each caller's file:line in FREEZE_SITES."""
    real_freeze = gc.freeze
    if getattr(real_freeze, "_records_sites", False):
        return

    def recording_freeze():
        caller = sys._getframe(1)
        while caller.f_back is not None and caller.f_code.co_filename.endswith("process_state.py"):
            caller = caller.f_back
        site = f"{caller.f_code.co_filename}:{caller.f_lineno}"
        FREEZE_SITES[site] = FREEZE_SITES.get(site, 0) + 1
        real_freeze()

    recording_freeze._records_sites = True
    gc.freeze = recording_freeze
    note_freeze_count("recorder installed (torch imported)")

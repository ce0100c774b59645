"""Tiny random models saved as real Hugging Face directories with a real character-level
tokenizer, built offline: families the native engine does not decode (GPT-2, Phi) and one it
does (Qwen3, the tiny preset's shape)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = string.printable[:95]  # digits, letters, punctuation, space


def char_tokenizer():
    """A transformers fast tokenizer with one token per printable character (ids 3..97)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = tokenizers.decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def family_config(family: str, vocab: int = 128):
    import transformers

    common = dict(vocab_size=vocab, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256, **common)
    if family == "phi":  # lm_head with a bias: log-probs through the model's own logits
        return transformers.PhiConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                      max_position_embeddings=256, **common)
    if family == "qwen3":
        from compilepass.core.shapes import PRESETS

        config = PRESETS["tiny"].to_hf_config()
        config.eos_token_id, config.pad_token_id = 1, 0
        return config
    raise ValueError(family)


def make_family_dir(path: Path, family: str = "gpt2", seed: int = 0, std: float = 0.15) -> Path:
    """A saved model directory (random weights drawn from N(0, std), so the policy is peaked
    enough to learn from) with the character tokenizer beside it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path

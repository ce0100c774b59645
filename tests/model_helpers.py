"""Tiny random models shared by the decoder and engine tests."""

from __future__ import annotations

import torch

from compilepass.core.models import add_lora, build_model


def make_model(name: str, lora: bool = False, seed: int = 0):
    """A tiny random model with weights large enough that greedy decoding does not collapse to one
    repeated token (HF's default init, std 0.02, makes tied tiny models emit a constant)."""
    model = build_model(name, dtype=torch.float32, attn_implementation="eager", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
            elif pname.endswith(".bias"):  # Qwen2's q/k/v biases
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    if lora:
        model = add_lora(model, rank=4, alpha=8, seed=seed, init_random=True, init_std=0.1)
    return model


def lora_step(model, optimizer=torch.optim.Adam, lr: float = 0.05, seed: int = 7, device="cpu") -> None:
    """One optimizer step on ``model``'s LoRA parameters (a language-model loss on a random batch of
    two 16-token rows); leaves the model in train mode."""
    model.train()
    opt = optimizer([p for n, p in model.named_parameters() if "lora_" in n], lr=lr)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed)).to(device)
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad()

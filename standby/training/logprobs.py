"""Per-token log-probs of completions under the policy, from hidden states: the logits never exist."""

from __future__ import annotations

from typing import Sequence

import torch

from compilepass.core.shapes import causal_lm_of
from compilepass.kernels import selective_log_softmax


def policy_logprobs(model, prompts: Sequence[Sequence[int]], completion_ids: torch.Tensor,
                    completion_mask: torch.Tensor, temperature: float = 1.0, pad_token_id: int = 0) -> torch.Tensor:
    """Per-token log-probs [B, N] (float32, 0 where the mask is 0) of ``completion_ids`` [B, N]
    after ``prompts`` (B token lists), under ``model`` (a peft model or a causal LM).

    Runs the model *body* (``causal_lm.model``) over prompt + completion, right-padded, and applies
    :func:`compilepass.kernels.selective_log_softmax` to the hidden states at the completion
    positions only: the [tokens x vocab] logits never exist. Gradients flow when enabled.

    No attention mask is passed: each row is its prompt, then its completion, then padding, so
    the causal mask alone is exact for every real position (none of them can see a later pad),
    and the padded positions' outputs are multiplied by the zero mask. Without a padding mask
    transformers uses SDPA's causal kernels instead of materializing a [B, 1, T, T] mask
    (B GiB at T = 32k).
    """
    causal_lm = causal_lm_of(model)
    device = completion_ids.device
    B, N = completion_ids.shape
    plen = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    T = int(plen.max()) + N
    input_ids = torch.full((B, T), int(pad_token_id), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    input_ids, plen_d = input_ids.to(device), plen.to(device)
    pos = plen_d[:, None] + torch.arange(N, device=device)[None, :]  # where completion token t sits
    input_ids.scatter_(1, pos, completion_ids.long())
    hidden = causal_lm.model(input_ids=input_ids, use_cache=False).last_hidden_state
    idx = (pos - 1).clamp_min(0)  # hidden state at position i predicts token i + 1
    h = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
    logp = selective_log_softmax(h, causal_lm.lm_head.weight, completion_ids.long(), temperature)
    return logp * completion_mask.to(logp.dtype)

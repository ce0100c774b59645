"""Per-token log-probs of completions under the policy, from hidden states: the logits never exist.

For the families whose output is a bias-free projection of the body's last hidden state (the
native engine's and a few more, :data:`HIDDEN_STATE_FAMILIES`), the log-probs come from the
hidden states through :func:`compilepass.kernels.selective_log_softmax`. Other families (an
output bias, logit soft-capping or scaling, or simply unchecked) go through the model's own
forward and its logits: exact for any causal LM, at the cost of the ``[B, T, vocab]`` logits.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from compilepass.core.shapes import FAMILIES, causal_lm_of
from compilepass.kernels import selective_log_softmax
from compilepass.standby.training.entropy import EntropyMeter, entropy_from_logits

__all__ = ["HIDDEN_STATE_FAMILIES", "hidden_state_head", "policy_logprobs"]

#: model types whose logits are exactly ``base_model(...).last_hidden_state @ lm_head.weight.T``.
HIDDEN_STATE_FAMILIES = (*FAMILIES, "mistral", "gpt2", "gemma", "phi3")


def hidden_state_head(causal_lm) -> Optional[torch.nn.Linear]:
    """The output projection when the logits are a bias-free projection of the body's last hidden
    state (checked: the family, no bias, no soft-capping or logit scaling), else None."""
    config = getattr(causal_lm, "config", None)
    if getattr(config, "model_type", None) not in HIDDEN_STATE_FAMILIES:
        return None
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return None
    return head


def policy_logprobs(model, prompts: Sequence[Sequence[int]], completion_ids: torch.Tensor,
                    completion_mask: torch.Tensor, temperature: float = 1.0, pad_token_id: int = 0,
                    entropy: Optional[EntropyMeter] = None) -> torch.Tensor:
    """Per-token log-probs [B, N] (float32, 0 where the mask is 0) of ``completion_ids`` [B, N]
    after ``prompts`` (B token lists), under ``model`` (a peft model or a causal LM).

    Runs the model *body* (``causal_lm.base_model``) over prompt + completion, right-padded, and
    applies :func:`compilepass.kernels.selective_log_softmax` to the hidden states at the
    completion positions only: the [tokens x vocab] logits never exist (families without such a
    head: the model's logits, see the module docstring). Gradients flow when enabled.
    ``entropy``: also add the policy's per-token entropy at the sampling temperature (no
    gradient; computed by the same kernel pass as the log-probs) to this meter, over the
    completion mask.

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
    idx = (pos - 1).clamp_min(0)  # the output at position i predicts token i + 1
    head = hidden_state_head(causal_lm)
    if head is None:
        logits = causal_lm(input_ids=input_ids, use_cache=False).logits
        z = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1])).float()
        if temperature != 1.0:
            z = z / temperature
        logp = torch.log_softmax(z, dim=-1).gather(-1, completion_ids.long()[..., None]).squeeze(-1)
        if entropy is not None:
            with torch.no_grad():
                entropy.add(entropy_from_logits(z.detach()), completion_mask)
    else:
        hidden = causal_lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        h = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        if entropy is None:
            logp = selective_log_softmax(h, head.weight, completion_ids.long(), temperature)
        else:  # from the same logit tiles as the log-probs: no second pass over the vocabulary
            logp, ent = selective_log_softmax(h, head.weight, completion_ids.long(), temperature, return_entropy=True)
            entropy.add(ent, completion_mask)
    return logp * completion_mask.to(logp.dtype)

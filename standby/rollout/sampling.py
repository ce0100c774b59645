"""Choosing the next token and recording it: the rollout engine's samplers, as plain functions.

Every sampler is the exponential race (``argmax(p / Exp(1))`` over the temperature-scaled,
top-k / top-p filtered softmax) or argmax: no host sync, no data-dependent shapes, reproducible
from the generator the noise is drawn with. :func:`sample_tokens` is the standalone entry point.

The engine's decode loop calls a ``_post_*`` function once per step: pick the tokens from the
step's logits and record the column (:func:`_record`) on the loop's static buffers (ids, mask,
log-probs, finished flags, stop ids, column index). With ``graph_sampling`` that call is captured
in the decode step's CUDA graph, the [B, V] noise drawn inside the graph from the engine's own
generator; otherwise it runs eagerly after the step, the noise drawn from a ``torch.Generator``
seeded per call. Both draw the same noise for the same seed and run the same code, so they give
the very same tokens, masks and log-probs. :func:`sampler_key` says which function a request
uses (one compiled / captured sampler per key).

Log-probs are ``log_softmax(logits / temperature)`` at the drawn token, top-k / top-p not
applied (temperature 1 when greedy): the policy's log-prob at the sampling temperature. The
filtered sampler also records the *sampling* log-prob, under the top-k / top-p truncated and
renormalized distribution the token was drawn from (vLLM's ``processed_logprobs``, what TRL's
importance-sampling correction compares against); without a filter the two are the same number
and only one is recorded.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["MAX_GRAPH_STOPS", "post_function", "sample_tokens", "sampler_key"]

#: Stop ids a graph-captured sampler checks (a fixed-size buffer); more fall back to eager sampling.
MAX_GRAPH_STOPS = 32


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B] long, logprobs [B] float32) from ``logits`` [B, V].

    ``temperature == 0``: argmax, log-probs of ``log_softmax(logits)``. Otherwise the logits are
    divided by ``temperature``, restricted to the ``top_k`` largest (0: all) and then to the
    smallest set whose probability reaches ``top_p`` (the most likely token always stays), and a
    token is drawn with the exponential-race trick (``argmax(p / Exp(1))``: no host sync,
    reproducible with ``generator``). The log-prob is ``log_softmax(logits / temperature)`` at
    the drawn token, top-k / top-p not applied.
    """
    if temperature == 0:
        return _greedy_pick(logits)
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if top_p < 1.0 and not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    # a 0-dim device tensor, as in the graph-captured sampler (one code path, bitwise the same numbers)
    temp = torch.full((), float(temperature), dtype=torch.float32, device=logits.device)
    noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(generator=generator)
    return _race_pick(logits, temp, noise, top_k, top_p)


def _greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float()
    tokens = x.argmax(-1)
    return tokens, x.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(x, -1)


def _race_pick(logits: torch.Tensor, temperature: torch.Tensor, noise: torch.Tensor, top_k: int = 0,
               top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponential race over ``softmax(filter(logits / temperature))`` with ``noise`` ~ Exp(1)
    [B, V] float32 (drawn by the caller); ``temperature`` a 0-dim float32 tensor."""
    tokens, logprobs, _ = _race_pick_filtered(logits, temperature, noise, top_k, top_p)
    return tokens, logprobs


def _race_pick_filtered(logits: torch.Tensor, temperature: torch.Tensor, noise: torch.Tensor, top_k: int = 0,
                        top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_race_pick` plus the drawn token's log-prob under the filtered distribution."""
    x = logits.float() / temperature
    logprobs_all = x.log_softmax(-1)
    filtered = x
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = filtered.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        filtered = torch.empty_like(filtered).scatter_(-1, order, sorted_logits)
    probs = filtered.softmax(-1)
    tokens = (probs / noise).argmax(-1)
    logprobs = logprobs_all.gather(-1, tokens[:, None])[:, 0]
    if filtered is x:
        return tokens, logprobs, logprobs
    return tokens, logprobs, filtered.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]


def _record(tokens, logprobs, ids, mask, lps, finished, stops, step, tokens_buf, pad, slogprobs=None,
            slps=None) -> None:
    """One generated column, in place on the loop's static buffers (all [B] / [B, L] views): write
    column ``step`` (a [1] long tensor) of ids / mask / logprobs (and sampling log-probs into
    ``slps`` when ``slogprobs`` is given) for the sequences still alive,
    mark those that hit a stop id (``stops`` [S]: -1 entries never match, S may be 0), set the
    next input tokens (pad for finished sequences) and advance ``step``. No host sync, no
    data-dependent shapes: the graph-captured sampler runs it inside the decode step's CUDA graph."""
    alive = ~finished
    ids.index_copy_(1, step, torch.where(alive, tokens, pad)[:, None])
    mask.index_copy_(1, step, alive.long()[:, None])
    lps.index_copy_(1, step, torch.where(alive, logprobs, 0.0)[:, None])
    if slogprobs is not None:
        slps.index_copy_(1, step, torch.where(alive, slogprobs, 0.0)[:, None])
    finished.logical_or_(alive & (tokens[:, None] == stops[None, :]).any(-1))
    tokens_buf.copy_(torch.where(finished, pad, tokens))
    step.add_(1)


def _post_greedy(logits, temperature, noise, ids, mask, lps, slps, finished, stops, step, tokens_buf, pad):
    tokens, lp = _greedy_pick(logits)
    _record(tokens, lp, ids, mask, lps, finished, stops, step, tokens_buf, pad)


def _post_sample(logits, temperature, noise, ids, mask, lps, slps, finished, stops, step, tokens_buf, pad):
    tokens, lp = _race_pick(logits, temperature, noise)
    _record(tokens, lp, ids, mask, lps, finished, stops, step, tokens_buf, pad)


def _post_filtered(top_k: int, top_p: float):
    def post(logits, temperature, noise, ids, mask, lps, slps, finished, stops, step, tokens_buf, pad):
        tokens, lp, slp = _race_pick_filtered(logits, temperature, noise, top_k, top_p)
        _record(tokens, lp, ids, mask, lps, finished, stops, step, tokens_buf, pad, slp, slps)
    return post


def sampler_key(temperature: float, top_k: int, top_p: float, vocab: int) -> tuple:
    """Which captured sampler a request uses: ("greedy",), ("sample",) (temperature only; any
    temperature shares it) or ("filtered", top_k, top_p)."""
    if temperature == 0:
        return ("greedy",)
    k = top_k if 0 < top_k < vocab else 0
    p = float(top_p) if top_p < 1.0 else 1.0
    if k == 0 and p == 1.0:
        return ("sample",)
    return ("filtered", k, p)


def post_function(key: tuple) -> Callable:
    """The (eager) sample-and-record function of a :func:`sampler_key` key, called as
    ``post(logits, temperature, noise, ids, mask, lps, slps, finished, stops, step, tokens_buf, pad)``;
    ``noise`` is None for "greedy"; ``slps`` (the sampling log-probs' buffer) is written by the
    "filtered" sampler only (the others' sampling log-probs are ``lps``)."""
    if key[0] == "greedy":
        return _post_greedy
    if key[0] == "sample":
        return _post_sample
    return _post_filtered(key[1], key[2])

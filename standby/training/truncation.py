"""Which completions were truncated: cut at the length limit instead of ending on their own.

TRL's ``mask_truncated_completions`` drops these from the loss (DAPO's overlong filtering): a
completion is truncated when its last token is not a stop token. Ours may also end on a stop
string (``generation.stop``), which is an ending too.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

__all__ = ["truncated_completions", "mask_truncated"]


def truncated_completions(completion_ids: torch.Tensor, completion_mask: torch.Tensor, stop_ids: Iterable[int],
                          texts: Optional[Sequence[str]] = None, stop_strings: Sequence[str] = ()) -> torch.Tensor:
    """bool [B] on the ids' device: True where row ``b``'s last unmasked token is not in
    ``stop_ids`` (EOS and the stop tokens) and its decoded text ``texts[b]`` holds none of
    ``stop_strings``. An empty completion counts as truncated (it never ended)."""
    lengths = completion_mask.long().sum(1)
    last = completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    stops = torch.tensor(sorted({int(t) for t in stop_ids}), dtype=torch.long, device=completion_ids.device)
    ended = (last[:, None] == stops[None, :]).any(-1) & (lengths > 0)
    if texts is not None and stop_strings:
        by_string = torch.tensor([any(s in t for s in stop_strings) for t in texts], device=completion_ids.device)
        ended = ended | by_string
    return ~ended


def mask_truncated(completion_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """``completion_mask`` with the truncated rows zeroed (same dtype): their tokens leave the loss
    and every token count (``dapo``'s ``num_items_in_batch`` too), as in TRL."""
    return completion_mask * (~truncated).to(completion_mask.dtype)[:, None]

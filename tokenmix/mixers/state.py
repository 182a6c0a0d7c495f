"""The decoding state every mixer's (and model's) ``init_state`` returns (its base lives in
``tokenmix.core.state``, below the ops, whose state types derive from it too), and a step's input as a
chunk."""

from __future__ import annotations

import torch

from ..core.checks import check_attention_mask
from ..core.state import DecodingState

__all__ = ["DecodingState", "as_chunk"]


def as_chunk(
    x: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """A step's input as a chunk: one token (B, ·) becomes (B, 1, ·), its mask (B,) becomes (B, 1).
    Returns the chunk, whether it was one token, and the checked mask as bool (B, T) or None."""
    single = x.dim() == 2
    if single:
        x = x[:, None]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
            attention_mask = attention_mask[:, None]
    return x, single, check_attention_mask(attention_mask, x.shape[0], x.shape[1], x.device)

"""``identity``: the control of every comparison — no token mixing at all.

Each position's output is its own input through the output projection, ``y_t = x_t W_o + b_o``, so a
model built with it has the same embeddings, positions, blocks, feed-forward layers and head as every
other, and sees nothing but each token itself (and its position, if the model gives one). What it
scores on a task is what the rest of the model scores without mixing: a mixer learned the task only if
it is told apart from it (docs/spec.md §13).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.checks import check_real
from ..core.chunks import Compacted
from ..core.packing import Packing
from .base import Mixer
from .registry import register_mixer
from .state import DecodingState


@register_mixer(
    "identity",
    paper="a control: no token mixing",
    time="O(N·d²)",
    memory="O(N·d)",
    state="nothing: O(1)",
    control=True,
)
class Identity(Mixer):
    """No mixing: ``y_t = x_t W_o + b_o`` at every position, causal and bidirectional alike.

    Args:
        dim: model width.
        causal: accepted for the common interface (nothing crosses positions either way).
        dropout: on the output (0).
    """

    def __init__(self, dim: int, *, causal: bool = False, dropout: float = 0.0) -> None:
        super().__init__(dim, causal=causal)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(check_real("dropout", dropout))

    def mix_sequence(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, packing: Packing | None = None
    ) -> torch.Tensor:
        return self.dropout(self.to_out(x))

    split_orders = ("contiguous", "zigzag")

    def mix_split(self, x, attention_mask, split):
        return self.dropout(self.to_out(x))  # nothing crosses positions, so nothing is exchanged

    def new_state(self, batch_size: int, capacity: int | None) -> DecodingState:
        return DecodingState(batch_size=batch_size, capacity=capacity)  # nothing to carry: positions only

    def advance(self, x: torch.Tensor, state: DecodingState, chunk: Compacted) -> torch.Tensor:
        return self.dropout(self.to_out(x))

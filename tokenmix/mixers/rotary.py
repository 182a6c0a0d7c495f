"""Rotary position embedding (Su et al. 2021), rotate-half form, shared by every mixer that offers it."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates pairs (x_i, x_{i+d/2}) of the last dim by angle p · base^(−2i/d) at position p.

    ``forward(x, offset)`` takes x: (..., N, d) at positions offset … offset+N−1 and returns the same
    shape and dtype; the angles are computed in float32.
    """

    def __init__(self, dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary embedding needs an even head dimension, got {dim}")
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        positions = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq.to(x.device)[None, :]
        cos, sin = angles.cos(), angles.sin()
        first, second = x.float().chunk(2, dim=-1)
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return rotated.to(x.dtype)

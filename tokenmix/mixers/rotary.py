"""Rotary position embedding (Su et al. 2021), shared by every mixer that offers it."""

from __future__ import annotations

import torch

from ..core.checks import check_real
from ..errors import InvalidValueError
from ..init import SelfInitialising


class RotaryEmbedding(SelfInitialising):
    """Rotates each pair (x_{2i}, x_{2i+1}) of the last dim by the angle p · base^(−2i/d) at position p,
    as RoFormer does: one complex multiplication per pair (written in reals), in float64 for float64
    inputs and float32 otherwise.

    ``forward(x, offset)`` takes x: (..., N, d) at positions offset … offset+N−1 and returns the same
    shape and dtype.
    """

    def __init__(self, dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise InvalidValueError(f"rotary embedding needs an even head dimension, got {dim}")
        self.dim, self.base = dim, check_real("rope_base", base, positive=True)
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def init_own(self) -> None:
        self.inv_freq.copy_(self.frequencies())  # a buffer to_empty() left unset, and no file holds

    def frequencies(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """base^(−2i/d) for the d/2 pairs (float32: the buffer's value, for whoever must refill it)."""
        return self.base ** (-torch.arange(0, self.dim, 2, dtype=dtype) / self.dim)

    def forward(
        self, x: torch.Tensor, offset: int | torch.Tensor = 0, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``offset``: the position of x's first entry, an int or one per batch row (B,) (each row of a
        batch of prompts counts its own real tokens). ``positions`` (N,), in place of an offset: each
        entry's own position (a packed row's, counted from its segment's start); or (B, N), each row's
        own (a chunk whose padding lies between real tokens)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        steps = torch.arange(x.shape[-2], device=x.device, dtype=dtype)
        # float64 inputs get float64 frequencies (the buffer holds them rounded to float32)
        exact = dtype == torch.float64
        inv_freq = self.frequencies(dtype).to(x.device) if exact else self.inv_freq.to(x.device, dtype)
        if positions is not None and positions.dim() == 2:  # (B, N) → (B, 1 …, N, d/2)
            angles = positions.to(x.device, dtype)[..., None] * inv_freq
            angles = angles.view(x.shape[0], *[1] * (x.dim() - 3), x.shape[-2], -1)
        elif positions is not None:
            angles = positions.to(x.device, dtype)[:, None] * inv_freq[None, :]
        elif isinstance(offset, torch.Tensor):  # (B,) → angles (B, 1 …, N, d/2) against x (B, …, N, d)
            positions = offset.to(x.device, dtype)[:, None] + steps
            angles = positions[..., None] * inv_freq
            angles = angles.view(x.shape[0], *[1] * (x.dim() - 3), x.shape[-2], -1)
        else:
            angles = (steps + offset)[:, None] * inv_freq[None, :]
        # The complex product (x_2i + i·x_2i+1)·e^{iθ} written out in reals: inductor fuses it, while
        # complex tensors fall back to eager kernels in a compiled graph.
        cos, sin = angles.cos(), angles.sin()
        even, odd = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2).to(x.dtype)

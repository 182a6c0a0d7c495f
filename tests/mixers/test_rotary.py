"""RotaryEmbedding against the rotation equation in float64 (RoFormer, Su et al. 2021)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.reference import assert_close
from tokenmix.mixers.rotary import RotaryEmbedding


def rotated(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x (..., N, d) at ``positions`` (..., N): pair i turned by p · base^(−2i/d), entry by entry."""
    out = torch.empty(x.shape, dtype=torch.float64)
    d = x.shape[-1]
    for index in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).view(-1, x.dim() - 1):
        index = tuple(index.tolist())
        p = float(positions[index[-positions.dim() :]])
        for i in range(d // 2):
            angle = p * base ** (-2 * i / d)
            a, b = float(x[index][2 * i]), float(x[index][2 * i + 1])
            out[index][2 * i] = a * math.cos(angle) - b * math.sin(angle)
            out[index][2 * i + 1] = a * math.sin(angle) + b * math.cos(angle)
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_the_rotation(dtype, tol):
    """An int offset, one offset per row, and explicit positions, on fresh inputs."""
    rotary = RotaryEmbedding(6, base=100.0)
    x = torch.randn(2, 5, 6, dtype=dtype)
    steps = torch.arange(5)
    assert_close(rotary(x, 3), rotated(x, (3 + steps).expand(2, 5), 100.0).to(dtype), tol)
    offsets = torch.tensor([0, 7])
    assert_close(rotary(x, offsets), rotated(x, offsets[:, None] + steps, 100.0).to(dtype), tol)
    positions = torch.tensor([0, 1, 0, 1, 2])
    assert_close(rotary(x, positions=positions), rotated(x, positions.expand(2, 5), 100.0).to(dtype), tol)
    heads = torch.randn(2, 3, 5, 6, dtype=dtype)  # (B, H, N, d) with one offset per row
    expected = rotated(heads, (offsets[:, None] + steps)[:, None].expand(2, 3, 5), 100.0)
    assert_close(rotary(heads, offsets), expected.to(dtype), tol)


def test_rope_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(8)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(i, j):
        rq = rotary(q.expand(i + 1, 8).clone(), 0)[i]
        rk = rotary(k.expand(j + 1, 8).clone(), 0)[j]
        return (rq * rk).sum()

    assert torch.allclose(score(5, 2), score(13, 10)) and not torch.allclose(score(5, 2), score(5, 4))
    # An offset shifts every position: rotating at offset 3 equals positions 3… of a longer run.
    x = torch.randn(4, 8)
    assert torch.allclose(rotary(x, 3), rotary(torch.cat((torch.zeros(3, 8), x)), 0)[3:], atol=1e-6)

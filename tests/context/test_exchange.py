"""How a split lays positions over the ranks (docs/spec.md §14), without a process group: every position
on exactly one rank in either order, and the zig-zag order balancing a causal all-pairs mixer's work."""

from __future__ import annotations

import pytest
import torch

from tokenmix.context import Split


def _splits(total: int, world: int, order: str) -> list[Split]:
    lengths = tuple(sum(n for _, n in own) for own in Split.layout(total, world, order))
    return [Split(None, rank, total, lengths, order) for rank in range(world)]


@pytest.mark.parametrize("order", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("total", [1, 5, 7, 8, 13, 64])
def test_every_position_is_on_exactly_one_rank(total, world, order):
    splits = _splits(total, world, order)
    positions = torch.cat([split.positions() for split in splits])
    assert sorted(positions.tolist()) == list(range(total))
    assert max(s.length for s in splits) - min(s.length for s in splits) <= (
        1 if order == "contiguous" else 2
    )
    whole = torch.arange(total) * 10
    for split in splits:
        assert torch.equal(split.local(whole, 0), split.positions() * 10)
        assert split.end == (max(split.positions().tolist()) + 1 if split.length else split.end)


def test_zigzag_pairs_the_head_with_the_tail():
    splits = _splits(16, 4, "zigzag")  # chunks of 2
    assert [s.ranges for s in splits] == [
        [(0, 2), (14, 16)],
        [(2, 4), (12, 14)],
        [(4, 6), (10, 12)],
        [(6, 8), (8, 10)],
    ]


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("total", [1024, 1000, 4099])
def test_zigzag_balances_a_causal_all_pairs_mixer(total, world):
    """A causal row i sees i + 1 keys: contiguous shares leave the last rank about 2·world − 1 times the
    first's work; zig-zag shares are within 4·world/N of each other (equal when 2·world divides N)."""
    zigzag = _splits(total, world, "zigzag")[0].work(causal=True)
    contiguous = _splits(total, world, "contiguous")[0].work(causal=True)
    assert sum(zigzag) == sum(contiguous) == total * (total + 1) // 2
    assert max(zigzag) / min(zigzag) < 1 + 4 * world / total
    assert max(contiguous) / min(contiguous) > 2 * world - 1.5
    if total % (2 * world) == 0:
        assert len(set(zigzag)) == 1


def test_a_split_refuses_what_it_is_not():
    with pytest.raises(ValueError, match=r"order must be one of \('contiguous', 'zigzag'\), got 'ring'"):
        Split.layout(8, 2, "ring")
    with pytest.raises(ValueError, match="lengths \\(5, 3\\) are not the contiguous split of N=8"):
        Split(None, 0, 8, (5, 3))
    zigzag = _splits(8, 2, "zigzag")[1]
    with pytest.raises(ValueError, match="this op takes a contiguous split"):
        zigzag.start  # noqa: B018
    with pytest.raises(ValueError, match=r"x must hold the whole sequence, N=8 at dim 0"):
        zigzag.local(torch.zeros(5), 0)

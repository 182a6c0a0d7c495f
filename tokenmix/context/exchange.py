"""What ranks exchange when a sequence is split over a context-parallel group (docs/spec.md §14): how the
positions lie over the ranks, and the three exchanges the mixers' shapes need — the whole sequence of
keys and values (all pairs), the positions beside a rank's edges (windows), and every rank's summary
(a state carried forward). All go through PyTorch's functional collectives with autograd
(``all_gather_single_autograd``), so gradients flow back to the rank that sent each piece."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from ..core.checks import check_positive_int
from ..errors import InvalidValueError


@dataclass(frozen=True)
class Split:
    """A sequence of ``total`` positions split over the ranks of ``group``: rank r holds the contiguous
    positions [starts[r], starts[r] + lengths[r]), near-equal in length (the first total % world ranks
    one longer), so any length works, a multiple of the ranks or not.

    Attributes:
        group: the context-parallel process group (None: the default group).
        rank: this process's rank in it.
        total: N, the whole sequence's length.
        lengths: each rank's number of positions, ``world`` entries.
    """

    group: dist.ProcessGroup | None
    rank: int
    total: int
    lengths: tuple[int, ...]

    @classmethod
    def of(cls, total: int, group: dist.ProcessGroup | None = None) -> Split:
        """The split of ``total`` positions over ``group`` (this process's place in it)."""
        total = check_positive_int("total", total)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        lengths = tuple(total // world + (r < total % world) for r in range(world))
        return cls(group, rank, total, lengths)

    @property
    def world(self) -> int:
        return len(self.lengths)

    @property
    def starts(self) -> list[int]:
        """Every rank's first global position, in rank order."""
        return [sum(self.lengths[:r]) for r in range(self.world)]

    @property
    def start(self) -> int:
        """The global index of this rank's first position."""
        return sum(self.lengths[: self.rank])

    @property
    def length(self) -> int:
        return self.lengths[self.rank]

    @property
    def stop(self) -> int:
        return self.start + self.length

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's positions of a whole-sequence tensor (N at ``dim``)."""
        if x.shape[dim] != self.total:
            raise InvalidValueError(
                f"x must hold the whole sequence, N={self.total} at dim {dim}, got {tuple(x.shape)}"
            )
        return x.narrow(dim, self.start, self.length)

    def check_local(self, name: str, x: torch.Tensor, dim: int) -> None:
        """Refuse a tensor that is not this rank's share (its length at ``dim``)."""
        if x.dim() <= dim or x.shape[dim] != self.length:
            raise InvalidValueError(
                f"{name} must hold this rank's {self.length} positions (rank {self.rank} of {self.world}, "
                f"N={self.total}) at dim {dim}, got shape {tuple(x.shape)}"
            )


def _gathered(x: torch.Tensor, split: Split) -> list[torch.Tensor]:
    """Every rank's ``x`` (the same shape on each), in rank order, with autograd."""
    stacked = funcol.all_gather_single_autograd(x.unsqueeze(0).contiguous(), 0, _group(split))
    return list(funcol.wait_tensor(stacked).unbind(0))


def _group(split: Split) -> dist.ProcessGroup:
    return split.group if split.group is not None else dist.group.WORLD


def gather_sequence(x: torch.Tensor, split: Split, dim: int) -> torch.Tensor:
    """The whole sequence from every rank's share ``x`` (its positions at ``dim``): the exchange of the
    all-pairs mixers, O(N) per rank. A bool tensor (a padding mask) is exchanged as int8."""
    split.check_local("x", x, dim)
    if x.dtype == torch.bool:
        return gather_sequence(x.to(torch.int8), split, dim).bool()
    longest = max(split.lengths)
    padded = pad_positions(x, dim, 0, longest - split.length)
    pieces = _gathered(padded, split)
    return torch.cat([piece.narrow(dim, 0, n) for piece, n in zip(pieces, split.lengths, strict=True)], dim)


def halo(x: torch.Tensor, split: Split, before: int, after: int, dim: int = 1) -> torch.Tensor:
    """This rank's share ``x`` with the ``before`` positions that precede it and the ``after`` that follow
    it in the whole sequence (zeros beyond its ends): the exchange of the windowed mixers. Each rank sends
    its first ``after`` and last ``before`` positions, O(window) per rank whatever N is; a rank shorter
    than the window sends all it has and the pieces of several neighbours make the halo."""
    split.check_local("x", x, dim)
    if before < 0 or after < 0:
        raise InvalidValueError(f"before and after must be ≥ 0, got {before} and {after}")
    edges = _gathered(torch.cat((_last(x, before, dim), _first(x, after, dim)), dim), split)
    # Rank j sent its last min(before, n_j) positions (left-padded) and its first min(after, n_j): the
    # positions just before this rank lie in the tails of the ranks before it, in order (a short rank's
    # tail is all of it), and those just after in the heads of the ranks after it.
    tails = [
        edge.narrow(dim, before - min(before, m), min(before, m))
        for edge, m in zip(edges[: split.rank], split.lengths, strict=False)
    ]
    heads = [
        edge.narrow(dim, before, min(after, m))
        for edge, m in zip(edges[split.rank + 1 :], split.lengths[split.rank + 1 :], strict=True)
    ]
    empty = x.narrow(dim, 0, 0)
    left = _last(torch.cat([empty, *tails], dim), before, dim)
    right = _first(torch.cat([empty, *heads], dim), after, dim)
    return torch.cat((left, x, right), dim)


def _last(x: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """The last ``count`` positions of x along ``dim``, zeros before them where x is shorter."""
    have = min(count, x.shape[dim])
    return pad_positions(x.narrow(dim, x.shape[dim] - have, have), dim, count - have, 0)


def _first(x: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """The first ``count`` positions of x along ``dim``, zeros after them where x is shorter."""
    have = min(count, x.shape[dim])
    return pad_positions(x.narrow(dim, 0, have), dim, 0, count - have)


def gather_summaries(summary: torch.Tensor, split: Split) -> list[torch.Tensor]:
    """Every rank's ``summary`` (a state of O(state) size, the same shape on each), in rank order: the
    exchange of the mixers that carry a state forward. A rank folds those before it (causal) or all of
    them (bidirectional)."""
    return _gathered(summary, split)


def pad_positions(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """``x`` with ``before`` and ``after`` zero positions along ``dim`` (a halo's ends, a widened share)."""
    if before == 0 and after == 0:
        return x
    shape = list(x.shape)
    parts = []
    if before:
        shape[dim] = before
        parts.append(x.new_zeros(shape))
    parts.append(x)
    if after:
        shape[dim] = after
        parts.append(x.new_zeros(shape))
    return torch.cat(parts, dim)

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

ORDERS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Split:
    """A sequence of ``total`` positions split over the ranks of ``group``, near-equal shares (any length
    works, a multiple of the ranks or not), in one of two orders:

    - ``"contiguous"``: rank r holds one run of positions, [starts[r], starts[r] + lengths[r]) (the
      first total % world ranks one longer). Every mixer's context form takes it.
    - ``"zigzag"`` (head–tail): the sequence cut into 2·world near-equal chunks, rank r holds chunks r
      and 2·world − 1 − r, in that order. A causal all-pairs mixer's row i costs i + 1 keys, so with
      contiguous shares the last rank does about 2·world − 1 times the first's work; paired this way
      every rank does about the same (``work``). Only the all-pairs mixers take it (docs/spec.md §14).

    Attributes:
        group: the context-parallel process group (None: the default group).
        rank: this process's rank in it.
        total: N, the whole sequence's length.
        lengths: each rank's number of positions, ``world`` entries.
        order: ``"contiguous"`` or ``"zigzag"``.
    """

    group: dist.ProcessGroup | None
    rank: int
    total: int
    lengths: tuple[int, ...]
    order: str = "contiguous"

    @classmethod
    def of(cls, total: int, group: dist.ProcessGroup | None = None, order: str = "contiguous") -> Split:
        """The split of ``total`` positions over ``group`` (this process's place in it) in ``order``."""
        total = check_positive_int("total", total)
        pieces = cls.layout(total, dist.get_world_size(group), order)
        lengths = tuple(sum(n for _, n in own) for own in pieces)
        return cls(group, dist.get_rank(group), total, lengths, order)

    @staticmethod
    def layout(total: int, world: int, order: str = "contiguous") -> tuple[tuple[tuple[int, int], ...], ...]:
        """Every rank's runs of positions, (start, length) in the order its share holds them."""
        if order not in ORDERS:
            raise InvalidValueError(f"order must be one of {ORDERS}, got {order!r}")
        parts = world if order == "contiguous" else 2 * world
        sizes = [total // parts + (i < total % parts) for i in range(parts)]
        runs = [(sum(sizes[:i]), size) for i, size in enumerate(sizes)]
        if order == "contiguous":
            return tuple((run,) for run in runs)
        return tuple((runs[r], runs[parts - 1 - r]) for r in range(world))

    def __post_init__(self) -> None:
        pieces = self.layout(self.total, len(self.lengths), self.order)
        if tuple(sum(n for _, n in own) for own in pieces) != tuple(self.lengths):
            raise InvalidValueError(
                f"lengths {tuple(self.lengths)} are not the {self.order} split of N={self.total}"
            )

    @property
    def world(self) -> int:
        return len(self.lengths)

    @property
    def pieces(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Every rank's runs of positions, (start, length), in rank order (``layout``)."""
        return self.layout(self.total, self.world, self.order)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """This rank's runs of global positions, [(start, stop)], in the order its share holds them."""
        return [(start, start + n) for start, n in self.pieces[self.rank] if n]

    @property
    def end(self) -> int:
        """One past this rank's last global position: the keys a causal all-pairs row here may see."""
        return max((stop for _, stop in self.ranges), default=0)

    def positions(self, device: torch.device | str | None = None, rank: int | None = None) -> torch.Tensor:
        """(n,) the global position of each of this rank's rows (of ``rank``'s, given one)."""
        own = self.pieces[self.rank if rank is None else rank]
        runs = [torch.arange(start, start + n, device=device) for start, n in own]
        return torch.cat(runs) if runs else torch.arange(0, device=device)

    def require_contiguous(self) -> tuple[int, int]:
        """This rank's one run, (start, stop); refused for a split in another order."""
        if self.order != "contiguous":
            raise InvalidValueError(
                f"this op takes a contiguous split (its context form passes windows or states from rank "
                f"to rank in order); the split is {self.order!r}, which only the all-pairs ops take"
            )
        start, n = self.pieces[self.rank][0]  # its one run, empty when N < world
        return start, start + n

    @property
    def starts(self) -> list[int]:
        """Every rank's first global position, in rank order (a contiguous split)."""
        self.require_contiguous()
        return [sum(self.lengths[:r]) for r in range(self.world)]

    @property
    def start(self) -> int:
        """The global index of this rank's first position (a contiguous split)."""
        return self.require_contiguous()[0]

    @property
    def length(self) -> int:
        return self.lengths[self.rank]

    @property
    def stop(self) -> int:
        """One past this rank's last global position (a contiguous split)."""
        return self.require_contiguous()[1]

    def work(self, causal: bool = True) -> list[int]:
        """Every rank's (query, key) pairs for an all-pairs mixer: Σ over its rows of the keys each sees."""
        pieces = self.pieces
        per_row = (lambda p: p + 1) if causal else (lambda p: self.total)
        return [sum(per_row(p) for start, n in own for p in range(start, start + n)) for own in pieces]

    def local(self, x: torch.Tensor, dim: int = 1, name: str = "x") -> torch.Tensor:
        """This rank's positions of a tensor that holds the whole sequence (or at least its first ``end``
        positions) along ``dim``."""
        if x.dim() <= dim or x.shape[dim] < self.end:
            raise InvalidValueError(
                f"{name} must hold the whole sequence, N={self.total} at dim {dim}, got {tuple(x.shape)}"
            )
        runs = [x.narrow(dim, start, stop - start) for start, stop in self.ranges] or [x.narrow(dim, 0, 0)]
        return runs[0] if len(runs) == 1 else torch.cat(runs, dim)

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
    runs = []  # (global start, positions) of every rank's runs, put in the sequence's order
    for share, own in zip(_gathered(padded, split), split.pieces, strict=True):
        offset = 0
        for start, n in own:
            runs.append((start, share.narrow(dim, offset, n)))
            offset += n
    return torch.cat([run for _, run in sorted(runs, key=lambda item: item[0])], dim)


def halo(x: torch.Tensor, split: Split, before: int, after: int, dim: int = 1) -> torch.Tensor:
    """This rank's share ``x`` with the ``before`` positions that precede it and the ``after`` that follow
    it in the whole sequence (zeros beyond its ends): the exchange of the windowed mixers. Each rank sends
    its first ``after`` and last ``before`` positions, O(window) per rank whatever N is; a rank shorter
    than the window sends all it has and the pieces of several neighbours make the halo."""
    left, right = halo_edges(x, split, before, after, dim)
    return torch.cat((left, x, right), dim)


def halo_edges(
    x: torch.Tensor, split: Split, before: int, after: int, dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``halo``'s two edges, the ``before`` positions and the ``after`` positions, without this rank's
    share: for a caller that lays more beside them (one concatenation, not two copies of the share)."""
    split.check_local("x", x, dim)
    split.require_contiguous()  # a neighbour's edge is the positions beside this rank's only then
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
    return left, right


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

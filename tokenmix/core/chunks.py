"""Feeding a recurrent state a chunk of tokens in one call (docs/spec.md §7): compaction.

``Mixer.step`` takes one token (B, dim) or a chunk (B, T, dim) with an optional (B, T) mask. A padded
position must leave the state unchanged and positions must count each row's real tokens only, so the
chunk is first *compacted*: each row's real tokens are moved, in order, to the front (a stable sort),
the mixer advances its state over that right-padded chunk, and the outputs are put back where the
tokens came from. A mixer's ``advance`` therefore only ever sees rows whose first ``counts[b]`` tokens
are real and whose others come after them, which a causal computation ignores for the real ones.

A state whose op takes any padding mask and counts positions itself (``DecodingState.counted_by_op``:
FLASH's, AFT-local's and AFT-conv's) is compacted there, once: ``Mixer.step`` hands such a family the
chunk ``as_given``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Compacted:
    """A chunk with each row's real tokens first: ``order[b, i]`` is where entry i came from; or (made by
    ``as_given``) a chunk left as it came, ``valid`` marking its real tokens wherever they are."""

    order: torch.Tensor | None  # (B, T) long, None when the chunk is left as it is
    valid: torch.Tensor | None  # (B, T) bool: which entries are real (compacted: the first counts[b])
    counts: torch.Tensor  # (B,) long: real tokens per row
    length: int  # T

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, …) in the caller's order → compacted order."""
        if self.order is None:
            return x
        index = self.order.view(*self.order.shape, *[1] * (x.dim() - 2)).expand_as(x)
        return x.gather(1, index)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T, …) outputs in compacted order → the caller's order, zero at padded positions."""
        if self.order is None:
            if self.valid is None:
                return y
            real = self.valid.view(*self.valid.shape, *[1] * (y.dim() - 2))
            return torch.where(real, y, torch.zeros((), dtype=y.dtype, device=y.device))
        inverse = self.order.argsort(1)
        index = inverse.view(*inverse.shape, *[1] * (y.dim() - 2)).expand_as(y)
        back = y.gather(1, index)
        real = self.valid.gather(1, inverse).view(*inverse.shape, *[1] * (y.dim() - 2))
        return torch.where(real, back, torch.zeros((), dtype=y.dtype, device=y.device))


def compact(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> Compacted:
    if mask is None:
        return Compacted(None, None, torch.full((batch,), length, dtype=torch.long, device=device), length)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    counts = mask.sum(1)
    valid = torch.arange(length, device=device)[None, :] < counts[:, None]
    return Compacted(order, valid, counts, length)


def as_given(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> Compacted:
    """The chunk left as it came (for an op that compacts it itself): ``gather`` is the identity, ``valid``
    is ``mask`` (real tokens anywhere in a row), and ``scatter`` zeroes the padded outputs."""
    counts = torch.full((batch,), length, dtype=torch.long, device=device) if mask is None else mask.sum(1)
    return Compacted(None, mask, counts, length)


def last_real(values: torch.Tensor, chunk: Compacted, keep: int) -> torch.Tensor:
    """The ``keep`` newest real entries of (B, L, …) ``values``: a right-aligned buffer of L − T slots
    followed by the compacted chunk of T, so the real entries end at index L − T + counts. Returns
    (B, keep, …), right-aligned again."""
    length, chunk_length = values.shape[1], chunk.length
    if chunk.order is None:  # every entry real: the newest ones are the last ones (a view, no copy)
        return values[:, length - keep :]
    end = length - chunk_length + chunk.counts  # (B,): one past the newest real entry
    index = (end[:, None] - keep + torch.arange(keep, device=values.device)).clamp(0, max(length - 1, 0))
    index = index.view(*index.shape, *[1] * (values.dim() - 2)).expand(-1, -1, *values.shape[2:])
    return values.gather(1, index)


def causal_aligned(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """(T, L) bool: the newest T of L positions as queries over all L keys, causal offsets aligned to the
    end — query i (position L − T + i) sees key j ≤ L − T + i. A cached form's mask."""
    newest = keys - queries + torch.arange(queries, device=device)
    return torch.arange(keys, device=device)[None, :] <= newest[:, None]


def continued(
    chunk: Compacted, positions: torch.Tensor, key_positions: torch.Tensor, key_real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a compacted chunk continued from a state lies, the state's kept keys first and the chunk's
    after them: the chunk's positions (B, T), counted on from each row's next ``positions`` (B,), and
    every key's position and whether it is real, (B, L) each (``key_positions``, ``key_real``: the kept
    keys')."""
    steps = positions[:, None] + torch.arange(chunk.length, device=positions.device)
    valid = chunk.valid if chunk.valid is not None else torch.ones_like(steps, dtype=torch.bool)
    return steps, torch.cat((key_positions, steps), 1), torch.cat((key_real, valid), 1)


def kept_then(kept: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """A state's kept entries (B, L − T, …) followed by a chunk's (B, T, …), in the chunk's dtype."""
    return torch.cat((kept.to(new.dtype), new), 1)

"""Token streams read in place: a corpus as one sequence of token ids over memory-mapped (or in-memory)
arrays, and the pieces of its documents for packing (docs/spec.md §12).

Nothing here copies a corpus: a window is read from the mapped pages when it is drawn, so resident
memory does not grow with the corpus and every process that maps the same files shares the page cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

SPLITS = ("train", "val", "test")


def split_bounds(total: int, fractions: Sequence[float]) -> list[int]:
    """Where the contiguous train/val/test parts of ``total`` positions start and end (enwik8's way:
    ``int`` of each fraction, the test part takes the rest)."""
    train_end = int(total * fractions[0])
    return [0, train_end, train_end + int(total * fractions[1]), total]


class TokenStream:
    """Token ids at positions ``[start, end)`` of the concatenation of ``arrays`` (1-D integer arrays,
    typically ``np.memmap``): indexing with a slice returns an int64 tensor of those tokens (a copy of
    that window only)."""

    def __init__(self, arrays: Sequence[np.ndarray], start: int = 0, end: int | None = None) -> None:
        self.arrays = list(arrays)
        self.offsets = np.cumsum([0, *(len(array) for array in self.arrays)])
        self.start = start
        self.end = int(self.offsets[-1]) if end is None else end

    def __len__(self) -> int:
        return self.end - self.start

    def view(self, start: int, end: int) -> TokenStream:
        """Positions ``[start, end)`` of this stream, as a stream over the same arrays."""
        return TokenStream(self.arrays, self.start + start, self.start + end)

    def __getitem__(self, index: slice) -> torch.Tensor:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("a TokenStream takes contiguous slices only")
        return torch.from_numpy(self.read(self.start + start, self.start + max(stop, start)))

    def read(self, start: int, end: int) -> np.ndarray:
        """Absolute positions ``[start, end)`` of the arrays as int64, across array boundaries."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts, position = [], start
        for index in range(max(first, 0), len(self.arrays)):
            if position >= end:
                break
            low = position - int(self.offsets[index])
            high = min(end - int(self.offsets[index]), len(self.arrays[index]))
            parts.append(np.asarray(self.arrays[index][low:high], dtype=np.int64))
            position += high - low
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def document_parts(ranges: np.ndarray, fractions: Sequence[float]) -> dict[str, np.ndarray]:
    """The documents (``ranges``: (D, 2) start/end positions in a stream) divided into train/val/test at
    ``fractions`` of their tokens counted without what lies between them; a document that a cut falls
    inside becomes two parts. Each split: (P, 2) start/end positions of its parts, in order."""
    ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    lengths = ranges[:, 1] - ranges[:, 0]
    before = np.concatenate(([0], np.cumsum(lengths)[:-1]))  # tokens of the documents before each
    bounds = split_bounds(int(lengths.sum()), fractions)
    parts = {}
    for name, low, high in zip(SPLITS, bounds, bounds[1:], strict=False):
        first = np.clip(low - before, 0, lengths)
        last = np.clip(high - before, 0, lengths)
        keep = last > first
        parts[name] = np.stack((ranges[keep, 0] + first[keep], ranges[keep, 0] + last[keep]), axis=1)
    return parts


class Pieces(Sequence[torch.Tensor]):
    """Each part (``parts``: (P, 2) positions in ``stream``) cut into consecutive pieces of at most
    ``seq_len`` positions, each with one more token where the part goes on (its last target); a part of
    one token is one piece with no target. Item ``k`` reads piece ``k`` from the stream."""

    def __init__(self, stream: TokenStream, parts: np.ndarray, seq_len: int) -> None:
        self.stream, self.parts, self.seq_len = stream, np.asarray(parts, dtype=np.int64), seq_len
        positions = np.maximum(self.parts[:, 1] - self.parts[:, 0] - 1, 1)
        self.ends = np.cumsum(-(-positions // seq_len))  # pieces up to and including each part

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self.ends, index, side="right"))
        start = int(self.parts[part, 0]) + (index - (int(self.ends[part - 1]) if part else 0)) * self.seq_len
        end = min(start + self.seq_len + 1, int(self.parts[part, 1]))
        return self.stream[start - self.stream.start : end - self.stream.start]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[index] for index in range(len(self)))

    def positions(self) -> int:
        """Tokens in the parts (what a split holds for packing)."""
        return int((self.parts[:, 1] - self.parts[:, 0]).sum())


__all__ = ["SPLITS", "Pieces", "TokenStream", "document_parts", "split_bounds"]

"""Byte-level text for character language modelling: the embedded corpus, any text or byte file, a
deterministic contiguous split, and random training windows."""

from __future__ import annotations

import gzip
from collections.abc import Mapping, Sized
from importlib import resources
from pathlib import Path

import torch

from ..errors import InvalidValueError, MissingFileError
from .stream import SPLITS, split_bounds

VOCAB_SIZE = 256  # bytes


def embedded_corpus() -> bytes:
    """Moby-Dick (public domain), shipped with the package: about 1.2 MB of UTF-8 text."""
    compressed = resources.files("tokenmix.data").joinpath("corpora/moby_dick.txt.gz").read_bytes()
    return gzip.decompress(compressed)


def check_data_file(path: str | Path, *, allow_empty: bool = False) -> Path:
    """``path`` as a ``Path``, if it is a file and (unless ``allow_empty``) not empty; nothing is read."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file {str(path)!r} does not exist or is not a file")
    if not allow_empty and path.stat().st_size == 0:
        raise InvalidValueError(f"data file {str(path)!r} holds no text (0 bytes)")
    return path


def load_corpus(path: str | Path | None = None, *, allow_empty: bool = False) -> bytes:
    """The bytes of ``path`` (any text or binary file; ``.gz`` is decompressed), or the embedded corpus.
    An empty file is refused unless ``allow_empty`` (a directory's empty document)."""
    if path is None:
        return embedded_corpus()
    path = check_data_file(path, allow_empty=True)
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:  # not gzip, or cut short
            raise InvalidValueError(
                f"data file {str(path)!r} ends in .gz but is not a complete gzip file ({error})"
            ) from None
    if not data and not allow_empty:
        raise InvalidValueError(f"data file {str(path)!r} holds no text (0 bytes)")
    return data


def split(data: bytes, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)) -> dict[str, torch.Tensor]:
    """Contiguous train/val/test byte tensors (uint8), in order, as enwik8 is split: 90/5/5 by default,
    which on the enwik8 file itself (10^8 bytes) is its standard 90M/5M/5M split."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise InvalidValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bounds = split_bounds(len(tensor), fractions)
    return {name: tensor[a:b] for name, a, b in zip(SPLITS, bounds, bounds[1:], strict=False)}


def check_long_enough(splits: Mapping[str, Sized], seq_len: int) -> None:
    """Every split must hold at least one window of seq_len inputs plus its next-token target."""
    for name, tensor in splits.items():
        if len(tensor) < seq_len + 1:
            raise InvalidValueError(
                f"the {name} split has {len(tensor)} tokens, too short for seq_len={seq_len} "
                f"(it needs at least {seq_len + 1}); use a larger corpus or a shorter --seq-len"
            )


def random_windows(
    data: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows: inputs (B, seq_len) and next-byte targets (B, seq_len), int64."""
    if len(data) < seq_len + 1:
        raise InvalidValueError(f"data of {len(data)} bytes is too short for seq_len={seq_len}")
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]

"""Text as documents, for training on packed sequences (docs/spec.md §8).

Where documents come from (``load_documents``): the embedded Moby-Dick, one document per chapter; a
directory, one document per file (sorted by name; ``.gz`` decompressed); a ``.jsonl`` file, one document
per line's ``"text"``; any other file, one document.

The separator convention: without packing, documents are joined into one byte stream with a blank line
(``b"\\n\\n"``) between them (``join_documents``), and windows cross their boundaries. With packing each
document is its own segment: no separator byte, ``cu_seqlens`` marks the boundaries, attention and every
other mixer stop there, positions restart, and a document predicts its own bytes from its own earlier
ones only (its first byte is no target, its last byte no input).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import InvalidValueError, MissingFileError
from .mqar import IGNORE
from .text import SPLITS, embedded_corpus, load_corpus

SEPARATOR = b"\n\n"
_CHAPTER = re.compile(rb"^CHAPTER \d+\.", flags=re.MULTILINE)


def embedded_document_ranges() -> list[tuple[int, int]]:
    """Where each chapter of the embedded Moby-Dick (135) lies in it, surrounding whitespace excluded."""
    text = embedded_corpus()
    starts = [match.start() for match in _CHAPTER.finditer(text)] or [0]
    starts[0] = 0  # anything before the first heading belongs to the first chapter
    ranges = []
    for a, b in zip(starts, [*starts[1:], len(text)], strict=True):
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        ranges.append((a + lead, max(a + lead, a + len(piece.rstrip()))))
    return ranges


def embedded_documents() -> list[bytes]:
    """The embedded Moby-Dick, one document per chapter (135)."""
    text = embedded_corpus()
    return [text[a:b] for a, b in embedded_document_ranges()]


def _read(path: Path) -> bytes:
    return load_corpus(path, allow_empty=True)  # an empty file is an empty document, dropped


def jsonl_text(path: Path, number: int, raw: bytes) -> bytes:
    """The ``"text"`` of line ``number`` (``raw``, without its newline) of the JSONL file ``path``, as
    UTF-8 (empty for a blank line)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidValueError(
            f"{str(path)!r} line {number} is not UTF-8 (its byte {error.start + 1} is "
            f"{raw[error.start : error.start + 1]!r})"
        ) from None
    if not line.strip():
        return b""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InvalidValueError(f"{str(path)!r} line {number} is not JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise InvalidValueError(f"{str(path)!r} line {number} has no string field 'text'")
    return record["text"].encode("utf-8")


def _jsonl(path: Path) -> list[bytes]:
    # Records end at "\n" only: U+2028 and the like are legal inside a JSON string (splitlines() cut there).
    return [jsonl_text(path, number, raw) for number, raw in enumerate(_read(path).split(b"\n"), 1)]


def document_files(directory: Path) -> list[Path]:
    """The files of a ``--data`` directory, one document each, in name order (hidden ones skipped); a
    subdirectory is refused rather than skipped, so no document is left out unsaid."""
    entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    folders = [p.name for p in entries if p.is_dir()]
    if folders:
        raise InvalidValueError(
            f"--data directory {str(directory)!r} holds subdirectories ({', '.join(folders[:3])}); its "
            f"documents are the files directly in it: move them there, or pass each directory"
        )
    files = [p for p in entries if p.is_file()]
    if not files:
        raise InvalidValueError(f"--data directory {str(directory)!r} holds no files")
    return files


def load_documents(path: str | Path | None = None) -> list[bytes]:
    """The documents of ``path`` (see the module docstring), or of the embedded corpus; empty ones are
    dropped."""
    if path is None:
        documents = embedded_documents()
    else:
        path = Path(path)
        if path.is_dir():
            documents = [_read(file) for file in document_files(path)]
        elif path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
            if not path.is_file():
                raise MissingFileError(f"data file {str(path)!r} does not exist or is not a file")
            documents = _jsonl(path)
        else:
            documents = [load_corpus(path)]
    documents = [document for document in documents if document]
    if not documents:
        raise InvalidValueError(f"data {str(path)!r} holds no text")
    return documents


def join_documents(documents: list[bytes]) -> bytes:
    """One byte stream, documents separated by a blank line (the convention without packing)."""
    return SEPARATOR.join(documents)


def split_documents(
    documents: list[bytes], fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
) -> dict[str, list[bytes]]:
    """Contiguous train/val/test lists of documents, cut at the same byte fractions as ``text.split``
    (a document the cut falls inside becomes two)."""
    total = sum(len(document) for document in documents)
    bounds = [0, int(total * fractions[0]), int(total * fractions[0]) + int(total * fractions[1]), total]
    splits: dict[str, list[bytes]] = {name: [] for name in SPLITS}
    offset = 0
    for document in documents:
        for name, low, high in zip(SPLITS, bounds, bounds[1:], strict=False):
            piece = document[max(low - offset, 0) : max(high - offset, 0)]
            if piece:
                splits[name].append(piece)
        offset += len(document)
    return splits


def pieces(documents: list[bytes], seq_len: int) -> list[torch.Tensor]:
    """Each document cut into consecutive pieces of at most ``seq_len`` bytes (uint8 tensors), each with
    one more byte where the document goes on (the next byte is its last target)."""
    out = []
    for document in documents:
        tensor = torch.frombuffer(bytearray(document), dtype=torch.uint8)
        # A piece of k + 1 bytes gives k positions; a one-byte document gives one with no target.
        for start in range(0, max(len(tensor) - 1, 1), seq_len):
            out.append(tensor[start : start + seq_len + 1])
    return out


def _place(piece: torch.Tensor, room: int, inputs: list, targets: list, segments: list, segment: int) -> int:
    """Append up to ``room`` positions of ``piece`` as one segment; returns how many were placed."""
    used = min(room, max(len(piece) - 1, 1))
    inputs.append(piece[:used].long())
    target = piece[1 : used + 1].long()
    if len(target) < used:  # the document's last byte: nothing of this document follows it
        target = torch.cat((target, torch.full((used - len(target),), IGNORE, dtype=torch.long)))
    targets.append(target)
    segments.append(torch.full((used,), segment, dtype=torch.long))
    return used


def packed_rows(
    parts: Sequence[torch.Tensor], seq_len: int, rows: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` rows of ``seq_len`` positions, each filled with pieces drawn at random (the last one cut
    to fit): inputs (B, N), next-byte targets (B, N) (IGNORE after a document's last byte), and each
    position's segment within its row (B, N). A pure function of ``generator``'s state."""
    out_inputs, out_targets, out_segments = [], [], []
    for _ in range(rows):
        inputs, targets, segments, filled, segment = [], [], [], 0, 0
        while filled < seq_len:
            piece = parts[int(torch.randint(len(parts), (1,), generator=generator))]
            filled += _place(piece, seq_len - filled, inputs, targets, segments, segment)
            segment += 1
        out_inputs.append(torch.cat(inputs))
        out_targets.append(torch.cat(targets))
        out_segments.append(torch.cat(segments))
    return torch.stack(out_inputs), torch.stack(out_targets), torch.stack(out_segments)


def packed_stream(
    parts: Sequence[torch.Tensor], seq_len: int, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every piece in order, packed into consecutive rows of ``seq_len`` (a piece that does not fit goes
    on in the next row as a new segment; the last partial row is dropped): the fixed evaluation rows, at
    most ``rows`` of them (None: all)."""
    inputs, targets, segments = [], [], []
    row_inputs, row_targets, row_segments, filled, segment = [], [], [], 0, 0
    for piece in parts:
        while True:
            used = _place(piece, seq_len - filled, row_inputs, row_targets, row_segments, segment)
            filled, segment = filled + used, segment + 1
            if filled == seq_len:
                inputs.append(torch.cat(row_inputs))
                targets.append(torch.cat(row_targets))
                segments.append(torch.cat(row_segments))
                row_inputs, row_targets, row_segments, filled, segment = [], [], [], 0, 0
            if used >= len(piece) - 1 or len(inputs) == rows:  # placed whole, or enough rows
                break
            piece = piece[used:]  # the rest goes on in the next row
        if len(inputs) == rows:
            break
    if not inputs:
        raise InvalidValueError(
            f"the documents hold fewer than seq_len={seq_len} positions: no full row to evaluate"
        )
    return torch.stack(inputs), torch.stack(targets), torch.stack(segments)


def cu_seqlens_of(segments: torch.Tensor) -> torch.Tensor:
    """The packed row (1, B·N) of rows whose positions carry segment ids (B, N): its cu_seqlens."""
    rows, length = segments.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = starts.flatten().nonzero().squeeze(1)
    return torch.cat((first, torch.tensor([rows * length], device=segments.device))).long()

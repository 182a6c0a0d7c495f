"""Prepared datasets: a corpus of any size tokenized once into memory-mappable shards (docs/spec.md §12).

``tokenmix prepare --data SRC --out DIR`` streams ``SRC`` (a text file, ``.gz`` included; a directory,
one document per file; a ``.jsonl`` file, one document per line's ``"text"``: as ``--data`` reads them)
through a tokenizer into ``DIR``:

- ``tokens-NNNNN.bin``: the token stream, raw little-endian integers of the smallest unsigned type for
  the vocabulary: the documents in order, joined by the tokenizer's separator (bytes: a blank line, as
  the raw path joins them; BPE: its end-of-text token);
- ``documents.bin``: int64 (start, end) stream positions of each document;
- ``tokenizer.json`` (BPE) and ``tokenmix-dataset.json``: the manifest (counts, the source's size and
  hash, the tokenizer's fingerprint, the split fractions and where each split lies).

The directory is written under a hidden staging name beside ``DIR`` and renamed into place at the end,
so an interrupted prepare never leaves a dataset that reads as complete.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import InvalidValueError, MissingFileError, RunDirectoryError
from .stream import SPLITS, Pieces, TokenStream, document_parts, split_bounds
from .tokenizer import (
    KINDS,
    TOKENIZER_FILE,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    token_dtype,
    train_bpe,
)

MANIFEST = "tokenmix-dataset.json"
FORMAT = "tokenmix-prepared-dataset"
VERSION = 1
DOCUMENTS = "documents.bin"
READ_BYTES = 8 << 20  # read the source this much at a time
BATCH_BYTES = 32 << 20  # text encoded in one call (the tokenizer's threads share it)
PIECE_BYTES = 1 << 20  # the pieces of that text (BPE encoded 64 MiB 1.4× as fast in 1 MiB pieces as in 8)
SHARD_TOKENS = 1 << 30  # tokens per shard file
BPE_SAMPLE_BYTES = 256 << 20  # BPE learns from the corpus's first this many bytes by default


def is_prepared(path: str | Path | None) -> bool:
    """Whether ``path`` is a prepared dataset's directory (it holds a manifest, complete or not)."""
    return path is not None and (Path(path) / MANIFEST).is_file()


# --- Reading the source: documents as streams of byte chunks -------------------------------------------


class _Digest:
    """A blake2b hash updated on a thread of its own (hashlib lets go of the GIL), in order, so that
    hashing the source overlaps reading, tokenizing and writing it."""

    def __init__(self) -> None:
        self.hash = hashlib.blake2b(digest_size=16)
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: deque[Future] = deque()

    def update(self, data: bytes) -> None:
        self.pending.append(self.pool.submit(self.hash.update, data))
        while len(self.pending) > 4:  # at most a few chunks held for hashing
            self.pending.popleft().result()

    def hexdigest(self) -> str:
        self.pool.shutdown(wait=True)
        return self.hash.hexdigest()


class _Hashing:
    """A binary file that hashes and counts what is read from it (the source as stored on disk)."""

    def __init__(self, file: BinaryIO, digest: Any, progress: Any) -> None:
        self.file, self.digest, self.progress = file, digest, progress

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.digest.update(data)
        self.progress.update(len(data))
        return data

    def readinto(self, buffer: Any) -> int:  # gzip reads through readinto
        count = self.file.readinto(buffer)
        self.digest.update(bytes(memoryview(buffer)[:count]))  # a copy: the buffer is reused
        self.progress.update(count)
        return count

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.file.close()


def _open(path: Path, digest: Any, progress: Any) -> tuple[BinaryIO, _Hashing]:
    """The file's text (``.gz`` decompressed) and the raw file under it (to close)."""
    raw = _Hashing(open(path, "rb"), digest, progress)  # noqa: SIM115 (closed by the caller)
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw  # type: ignore[arg-type]
    return raw, raw  # type: ignore[return-value]


def _file_chunks(path: Path, digest: Any, progress: Any) -> Iterator[bytes]:
    file, raw = _open(path, digest, progress)
    try:
        while chunk := file.read(READ_BYTES):
            yield chunk
    except (OSError, EOFError) as error:  # a .gz file that is not gzip, or cut short
        raise InvalidValueError(f"data file {str(path)!r} could not be read as gzip ({error})") from None
    finally:
        raw.close()


def _jsonl_documents(path: Path, digest: Any, progress: Any) -> Iterator[Iterator[bytes]]:
    from .documents import jsonl_text

    for number, line in enumerate(_lines(_file_chunks(path, digest, progress)), 1):
        yield iter((jsonl_text(path, number, line),))


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines ending at b"\\n" only (U+2028 and the like are legal inside a JSON string)."""
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


@dataclass
class Source:
    """What ``prepare`` reads: the path, its files and their total size on disk."""

    path: Path
    files: list[Path]
    size: int

    @classmethod
    def of(cls, path: str | Path) -> Source:
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise InvalidValueError(f"--data directory {str(path)!r} holds no files")
        elif path.is_file():
            files = [path]
        else:
            raise MissingFileError(f"--data {str(path)!r} does not exist")
        return cls(path, files, sum(file.stat().st_size for file in files))

    @property
    def jsonl(self) -> bool:
        return self.path.is_file() and (self.path.suffix == ".jsonl" or self.path.name.endswith(".jsonl.gz"))

    def documents(self, digest: Any, progress: Any) -> Iterator[Iterator[bytes]]:
        """Each document as an iterator of its byte chunks, in order (empty ones included)."""
        if self.jsonl:
            yield from _jsonl_documents(self.path, digest, progress)
            return
        for file in self.files:
            digest.update(file.name.encode() + b"\0")  # a renamed file changes the corpus's order
            yield _file_chunks(file, digest, progress)


# --- Writing ----------------------------------------------------------------------------------------------


class _ShardWriter:
    """Tokens appended to ``tokens-NNNNN.bin`` files of at most ``shard_tokens`` each."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.file: BinaryIO | None = None
        self.total = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self.file.write(tokens[:room].astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            taken = min(room, len(tokens))
            self.shards[-1]["tokens"] += taken
            self.total += taken
            tokens = tokens[taken:]

    def _next(self) -> None:
        self.close()
        name = f"tokens-{len(self.shards):05d}.bin"
        self.file = open(self.directory / name, "wb")  # noqa: SIM115 (closed in close())
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _encoded(tokenizer: Tokenizer, documents: Iterator[Iterator[bytes]]) -> Iterator[tuple[int, np.ndarray]]:
    """(document number, tokens) of every document's text in order, encoded in batches across documents,
    a document's text cut where the tokenizer allows (where it finds no cut, the text waits for more)."""
    batch: list[bytes] = []
    owners: list[int] = []
    held = 0
    for number, chunks in enumerate(documents):
        pending = b""
        for chunk in chunks:
            pending += chunk
            while len(pending) >= PIECE_BYTES and (
                cut := tokenizer.cut(pending[:PIECE_BYTES]) or tokenizer.cut(pending)
            ):
                batch.append(pending[:cut])
                owners.append(number)
                held, pending = held + cut, pending[cut:]
            if held >= BATCH_BYTES:
                yield from zip(owners, tokenizer.encode_batch(batch), strict=True)
                batch, owners, held = [], [], 0
        if pending:
            batch.append(pending)
            owners.append(number)
            held += len(pending)
        if held >= BATCH_BYTES or len(batch) >= 4096:
            yield from zip(owners, tokenizer.encode_batch(batch), strict=True)
            batch, owners, held = [], [], 0
    yield from zip(owners, tokenizer.encode_batch(batch), strict=True)


def _bpe_sample(source: Source, limit: int) -> Iterator[bytes]:
    """The source's first ``limit`` bytes of text, document by document (what BPE learns from)."""
    seen, digest = 0, hashlib.blake2b()
    for document in source.documents(digest, _NoProgress()):
        for chunk in document:
            yield chunk[: limit - seen]
            seen += len(chunk)
            if seen >= limit:
                return


class _NoProgress:
    def update(self, count: int) -> None:
        pass


def prepare(
    data: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path = "bytes",
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    sample_bytes: int = BPE_SAMPLE_BYTES,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool | None = None,
) -> Path:
    """Tokenize ``data`` into a prepared dataset at ``out`` (see the module docstring) and return it.

    Args:
        data: a text file (``.gz`` read through), a directory (one document per file) or a ``.jsonl``.
        out: the dataset's directory: new, empty, or a prepared dataset (replaced); anything else is
            refused.
        tokenizer: ``"bytes"``, ``"bpe"`` (learned from the first ``sample_bytes`` of ``data``), or a BPE
            tokenizer to reuse: its tokenizer.json, or a prepared dataset or run that holds one.
        vocab_size: BPE's vocabulary, the 256 bytes and the end-of-text token included. Default: 8192.
        val_fraction: the validation split's share of the tokens, and the test split's. Default: 0.05.
        sample_bytes: how much text BPE learns from. Default: 256 MiB.
        shard_tokens: tokens per shard file. Default: 2**30.
        progress: a progress bar (None: when stderr is a terminal).
    """
    from tqdm import tqdm

    source = Source.of(data)
    if not isinstance(val_fraction, float | int) or not 0 < val_fraction < 1 / 3:
        raise InvalidValueError(f"--val-fraction must be in (0, 1/3), got {val_fraction!r}")
    for name, value in (("shard_tokens", shard_tokens), ("sample_bytes", sample_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    given = None if tokenizer in KINDS else _tokenizer_file(tokenizer)
    out = _check_out(Path(out))
    if given is not None:
        text_tokenizer: Tokenizer = BPETokenizer.load(given)
    elif tokenizer == "bpe":
        text_tokenizer = train_bpe(_bpe_sample(source, sample_bytes), vocab_size)
    else:
        text_tokenizer = ByteTokenizer()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-staging-", dir=out.parent))
    try:
        bar = tqdm(total=source.size, unit="B", unit_scale=True, desc="prepare", disable=not progress)
        with bar:
            manifest = _write(source, text_tokenizer, staging, shard_tokens, bar)
        manifest["fractions"] = [1 - 2 * val_fraction, val_fraction, val_fraction]
        manifest["splits"] = _split_record(manifest, staging)
        text_tokenizer.save(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(out, staging)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _tokenizer_file(given: str | Path) -> Path:
    """A BPE tokenizer to reuse: a tokenizer.json, or a directory holding one (a prepared dataset, a run)."""
    path = Path(given)
    path = path / TOKENIZER_FILE if path.is_dir() else path
    if not path.is_file():
        raise InvalidValueError(
            f"--tokenizer must be bytes, bpe or a tokenizer.json (or a directory holding one: a prepared "
            f"dataset, a run), got {str(given)!r}"
        )
    return path


def _write(source: Source, tokenizer: Tokenizer, staging: Path, shard_tokens: int, bar: Any) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    shards = _ShardWriter(staging, dtype, shard_tokens)
    digest, lengths = _Digest(), tokenizer.token_lengths
    one_byte_each = bool((lengths == 1).all())  # bytes: no need to look the tokens up
    separator = np.asarray(tokenizer.separator, dtype=np.int64)
    text_bytes, count, current, start = 0, 0, -1, 0
    with open(staging / DOCUMENTS, "wb") as index:
        for number, tokens in _encoded(tokenizer, source.documents(digest, bar)):
            if number != current:  # the first text of the next non-empty document
                if count:
                    index.write(np.array([start, shards.total], dtype="<i8").tobytes())
                    shards.write(separator)
                current, start, count = number, shards.total, count + 1
            shards.write(tokens)
            text_bytes += len(tokens) if one_byte_each else int(lengths[tokens].sum())
        if count:
            index.write(np.array([start, shards.total], dtype="<i8").tobytes())
    shards.close()
    if not count:
        raise InvalidValueError(f"--data {str(source.path)!r} holds no text")
    return {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": {
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "fingerprint": tokenizer.fingerprint,
        },
        "dtype": dtype.name,
        "tokens": shards.total,
        "documents": count,
        "text_bytes": text_bytes,
        "shards": shards.shards,
        "source": {"path": str(source.path.resolve()), "size": source.size, "blake2b": digest.hexdigest()},
    }


def _split_record(manifest: dict, staging: Path) -> dict[str, Any]:
    """Where each split lies: stream positions (windows) and document parts (packing)."""
    bounds = split_bounds(manifest["tokens"], manifest["fractions"])
    ranges = np.fromfile(staging / DOCUMENTS, dtype="<i8").reshape(-1, 2)
    parts = document_parts(ranges, manifest["fractions"])
    return {
        name: {"start": low, "end": high, "document_parts": len(parts[name])}
        for name, low, high in zip(SPLITS, bounds, bounds[1:], strict=False)
    }


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {str(out)!r} is a file; prepare writes a directory")
    if out.is_dir() and any(out.iterdir()) and not is_prepared(out):
        raise RunDirectoryError(
            f"--out {str(out)!r} exists, is not empty and is not a prepared dataset; prepare writes a new "
            f"directory (or replaces a prepared dataset)"
        )
    return out


def _replace(out: Path, staging: Path) -> None:
    """Put ``staging`` at ``out``: an empty directory or an earlier prepared dataset there goes."""
    if not out.exists():
        staging.rename(out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
    os.replace(out, old / out.name)
    staging.rename(out)
    shutil.rmtree(old)


# --- Reading a prepared dataset ---------------------------------------------------------------------------


class PreparedDataset:
    """A prepared dataset, checked and mapped: ``stream`` over every shard, ``tokenizer``, ``fractions``,
    ``documents`` ((D, 2) stream positions). Opening reads the manifest and maps the files; it reads no
    token."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        manifest = self.manifest
        self.tokenizer = load_tokenizer(manifest["tokenizer"]["kind"], self.path)
        if self.tokenizer.fingerprint != manifest["tokenizer"]["fingerprint"]:
            raise InvalidValueError(
                f"prepared dataset {str(self.path)!r}: its tokenizer file is not the tokenizer its tokens "
                f"were made with (the manifest records another); prepare the dataset again"
            )
        dtype = token_dtype(self.tokenizer.vocab_size).newbyteorder("<")
        arrays = [self._map(shard["file"], dtype, shard["tokens"]) for shard in manifest["shards"]]
        self.stream = TokenStream(arrays)
        if len(self.stream) != manifest["tokens"]:
            raise InvalidValueError(f"prepared dataset {str(self.path)!r}: its shards do not add up")
        self.documents = self._map(DOCUMENTS, np.dtype("<i8"), 2 * manifest["documents"]).reshape(-1, 2)
        self.fractions = tuple(manifest["fractions"])

    @property
    def fingerprint(self) -> str:
        """A hash of what decides the tokens and splits: the source, the tokenizer, the counts."""
        manifest = self.manifest
        decided = [manifest["source"].get("blake2b"), manifest["tokenizer"]["fingerprint"]]
        decided += [manifest["tokens"], manifest["documents"], manifest["fractions"]]
        return hashlib.blake2b(json.dumps(decided).encode(), digest_size=16).hexdigest()

    def _map(self, name: str, dtype: np.dtype, count: int) -> np.ndarray:
        file = self.path / name
        expected = count * dtype.itemsize
        size = file.stat().st_size if file.is_file() else None
        if size != expected:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise InvalidValueError(
                f"prepared dataset {str(self.path)!r}: {name} {found}, the manifest says {expected:,} "
                f"(truncated or changed; prepare the dataset again)"
            )
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(file, dtype=dtype, mode="r", shape=(count,))


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise MissingFileError(f"{str(path)!r} is not a prepared dataset (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidValueError(
            f"prepared dataset {str(path)!r}: {MANIFEST} is not readable JSON ({error}); it was cut short "
            f"or edited: prepare the dataset again"
        ) from None
    needed = ("tokenizer", "dtype", "tokens", "documents", "shards", "fractions")
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or any(k not in manifest for k in needed)
    ):
        raise InvalidValueError(f"prepared dataset {str(path)!r}: {MANIFEST} is not a tokenmix manifest")
    if manifest.get("version") != VERSION:
        raise InvalidValueError(
            f"prepared dataset {str(path)!r} has format version {manifest.get('version')!r}; this tokenmix "
            f"reads version {VERSION}: prepare it again"
        )
    return manifest


# --- What a language-model task reads -------------------------------------------------------------------


class TextData:
    """A corpus as the charlm task reads it: its tokenizer, one stream per split for windows, and the
    documents' pieces per split for packing. From a prepared dataset, a raw file (mapped, not copied)
    or documents held in memory."""

    def __init__(
        self,
        stream: TokenStream,
        documents: np.ndarray,
        tokenizer: Tokenizer,
        fractions: tuple[float, ...] = (0.9, 0.05, 0.05),
        fingerprint: str | None = None,
    ) -> None:
        self.stream, self.documents, self.tokenizer, self.fractions = stream, documents, tokenizer, fractions
        self.fingerprint = fingerprint  # what the tokens are, for a prepared dataset (None: raw text)
        bounds = split_bounds(len(stream), fractions)
        self.splits = {
            name: stream.view(a, b) for name, a, b in zip(SPLITS, bounds, bounds[1:], strict=False)
        }

    @classmethod
    def load(cls, data: str | Path | None) -> TextData:
        """The corpus ``data`` names: a prepared dataset, a raw text/byte file, a directory or ``.jsonl``
        of documents, or the embedded corpus (None)."""
        from .documents import SEPARATOR, embedded_document_ranges, load_documents
        from .text import check_data_file, embedded_corpus, load_corpus

        if is_prepared(data):
            dataset = PreparedDataset(data)  # type: ignore[arg-type]
            return cls(
                dataset.stream, dataset.documents, dataset.tokenizer, dataset.fractions, dataset.fingerprint
            )
        if data is None:  # the embedded corpus as one stream, its chapters the documents
            text = np.frombuffer(embedded_corpus(), dtype=np.uint8)
            return cls(TokenStream([text]), np.array(embedded_document_ranges()), ByteTokenizer())
        path = Path(data)
        if path.is_file() and path.suffix != ".gz" and ".jsonl" not in path.name:
            check_data_file(path)  # exists, not empty: nothing read
            mapped = np.memmap(path, dtype=np.uint8, mode="r")
            return cls(TokenStream([mapped]), np.array([[0, len(mapped)]]), ByteTokenizer())
        many = path.is_dir() or ".jsonl" in path.name
        documents = load_documents(path) if many else [load_corpus(path)]
        joined = SEPARATOR.join(documents)
        starts = np.cumsum([0, *(len(d) + len(SEPARATOR) for d in documents[:-1])])
        ranges = np.stack((starts, starts + [len(d) for d in documents]), axis=1)
        return cls(TokenStream([np.frombuffer(joined, dtype=np.uint8)]), ranges, ByteTokenizer())

    def pieces(self, seq_len: int) -> dict[str, Pieces]:
        """Each split's document parts in pieces of ``seq_len`` positions (for packing)."""
        parts = document_parts(self.documents, self.fractions)
        return {name: Pieces(self.stream, parts[name], seq_len) for name in SPLITS}


__all__ = ["MANIFEST", "PreparedDataset", "Source", "TextData", "is_prepared", "prepare"]

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

import glob
import gzip
import hashlib
import json
import math
import os
import re
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
from ..interrupts import TerminateRaises, interruptible
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
# Text encoded in one call, in pieces the tokenizer's threads share. The call's encodings hold ~40× its
# text until read out (32 MiB: 1.2 GB over the process's base); 4 MiB in 256 KiB pieces held 0.23 GB at
# 0.95× the speed of 32 MiB in 1 MiB pieces (2 cores, 30 MB of text).
BATCH_BYTES = 4 << 20
PIECE_BYTES = 256 << 10
SHARD_TOKENS = 1 << 30  # tokens per shard file
BPE_SAMPLE_BYTES = 256 << 20  # BPE learns from the corpus's first this many bytes by default


SHARD_NAME = re.compile(r"tokens-\d{5}\.bin")
STAGING_OWNER = ".tokenmix-staging-owner"  # the pid of the prepare writing a staging directory


def is_prepared(path: str | Path | None) -> bool:
    """Whether ``path`` is a prepared dataset's directory (it holds a manifest, complete or not)."""
    return path is not None and (Path(path) / MANIFEST).is_file()


def _has_dataset_files(directory: Path) -> bool:
    """Whether ``directory`` holds a prepared dataset's token files (its manifest aside)."""
    return directory.is_dir() and (
        (directory / DOCUMENTS).is_file() or any(SHARD_NAME.fullmatch(p.name) for p in directory.iterdir())
    )


def check_text_source(path: Path, flag: str = "--data") -> None:
    """Refuse reading a prepared dataset's files as text: a dataset directory that lost its manifest,
    or a file inside a dataset (its token shards would be read, and trained on, as bytes)."""
    if path.is_dir() and not is_prepared(path) and _has_dataset_files(path):
        raise InvalidValueError(
            f"{flag} {str(path)!r} holds a prepared dataset's token files but no {MANIFEST} (damaged, or "
            f"interrupted while written): its tokens are not text; prepare the dataset again"
        )
    ours = path.name in (MANIFEST, DOCUMENTS, TOKENIZER_FILE) or SHARD_NAME.fullmatch(path.name)
    if ours and path.is_file() and (is_prepared(path.parent) or _has_dataset_files(path.parent)):
        raise InvalidValueError(
            f"{flag} {str(path)!r} is a file of the prepared dataset {str(path.parent)!r}; pass the "
            f"dataset's directory"
        )


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
        check_text_source(path)
        if path.is_dir():
            from .documents import document_files

            files = document_files(path)
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
                yield from zip(owners, interruptible(tokenizer.encode_batch, batch), strict=True)
                batch, owners, held = [], [], 0
        if pending:
            batch.append(pending)
            owners.append(number)
            held += len(pending)
        if held >= BATCH_BYTES or len(batch) >= 4096:
            yield from zip(owners, interruptible(tokenizer.encode_batch, batch), strict=True)
            batch, owners, held = [], [], 0
    yield from zip(owners, interruptible(tokenizer.encode_batch, batch), strict=True)


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
    out, replaced = _check_out(Path(out))
    stopped = "interrupted: nothing was written to --out (its earlier dataset, if any, is as it was)"
    staging: Path | None = None
    with TerminateRaises(lambda: KeyboardInterrupt(f"{stopped} (SIGTERM)")):
        try:
            if given is not None:
                text_tokenizer: Tokenizer = BPETokenizer.load(given)
            elif tokenizer == "bpe":
                text_tokenizer = train_bpe(_bpe_sample(source, sample_bytes), vocab_size)
            else:
                text_tokenizer = ByteTokenizer()
            out.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_staging(out)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-staging-", dir=out.parent))
            (staging / STAGING_OWNER).write_text(str(os.getpid()))
            bar = tqdm(total=source.size, unit="B", unit_scale=True, desc="prepare", disable=not progress)
            with bar:
                manifest = _write(source, text_tokenizer, staging, shard_tokens, bar)
            manifest["fractions"] = [1 - 2 * val_fraction, val_fraction, val_fraction]
            manifest["splits"] = _split_record(manifest, staging)
            text_tokenizer.save(staging)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            (staging / STAGING_OWNER).unlink()
            _replace(out, staging, replaced)
        except KeyboardInterrupt as stop:
            raise KeyboardInterrupt(str(stop) or stopped) from None
        finally:
            if staging is not None and staging.exists():
                shutil.rmtree(staging)
    return out


def _remove_stale_staging(out: Path) -> None:
    """Remove the staging directories of earlier prepares to ``out`` whose process is gone (killed
    with no chance to clean up: ``kill -9``, a power cut)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}-staging-*"):
        owner = path / STAGING_OWNER
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue  # not ours, or being written this instant: left alone
        if not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


def _check_out(out: Path) -> tuple[Path, list[str] | None]:
    """Where to write (a symlink resolved) and, if a prepared dataset is there, the files it consists of
    (what gets replaced; anything else in the directory is kept). Refused before any work: a file, a link
    to nothing, a directory that is neither empty nor a valid prepared dataset."""
    if out.is_symlink():
        if not out.exists():
            raise RunDirectoryError(f"--out {str(out)!r} is a symlink to nothing; prepare writes a directory")
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {str(out)!r} is a file; prepare writes a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out, None
    if not is_prepared(out):
        raise RunDirectoryError(
            f"--out {str(out)!r} exists, is not empty and is not a prepared dataset; prepare writes a new "
            f"directory (or replaces a prepared dataset)"
        )
    try:
        manifest = _read_manifest(out)
    except InvalidValueError as error:
        raise RunDirectoryError(f"--out: {error}; it is not replaced (remove it yourself)") from None
    return out, _dataset_files(manifest, out)


def _dataset_files(manifest: dict[str, Any], path: Path) -> list[str]:
    """The files a prepared dataset consists of, by its manifest, the manifest last."""
    names = [shard["file"] for shard in manifest["shards"]] + [DOCUMENTS]
    if manifest["tokenizer"]["kind"] == "bpe":
        names.append(TOKENIZER_FILE)
    return [name for name in names if (path / name).is_file()] + [MANIFEST]


def _replace(out: Path, staging: Path, replaced: list[str] | None) -> None:
    """Put ``staging``'s dataset at ``out``: new, empty, or holding a prepared dataset (its files
    ``replaced``), whose files alone go; a user's files beside them stay."""
    if not out.exists():
        staging.rename(out)
        return
    if replaced is None:  # empty
        out.rmdir()
        staging.rename(out)
        return
    if sorted(p.name for p in out.iterdir()) == sorted(replaced):  # the dataset alone: swapped whole
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
        os.replace(out, old / out.name)
        staging.rename(out)
        shutil.rmtree(old)
        return
    (out / MANIFEST).unlink()  # first: until the new manifest is in, the directory reads as no dataset
    for name in replaced[:-1]:
        (out / name).unlink()
    new = sorted(p.name for p in staging.iterdir())
    for name in [*(n for n in new if n != MANIFEST), MANIFEST]:  # the manifest last
        os.replace(staging / name, out / name)


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
    wrong = _manifest_error(manifest)
    if wrong:
        raise InvalidValueError(
            f"prepared dataset {str(path)!r}: {MANIFEST} {wrong} (edited?); prepare it again"
        )
    return manifest


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_error(manifest: dict[str, Any]) -> str | None:
    """What in a manifest's fields is not as prepare writes them (None: nothing)."""
    fractions = manifest["fractions"]
    numbers = isinstance(fractions, list) and len(fractions) == 3
    numbers = numbers and all(isinstance(f, float | int) and not isinstance(f, bool) for f in fractions)
    if not numbers or not all(math.isfinite(f) and 0 < f < 1 for f in fractions):
        return f"has fractions {fractions!r}; three numbers in (0, 1) were expected"
    if abs(sum(fractions) - 1) > 1e-9:
        return f"has fractions {fractions!r}, which do not add up to 1"
    for key in ("tokens", "documents"):
        if not _count(manifest[key]):
            return f"has {key} {manifest[key]!r}; a count was expected"
    tokenizer = manifest["tokenizer"]
    if not isinstance(tokenizer, dict) or tokenizer.get("kind") not in KINDS:
        return f"has tokenizer {tokenizer!r}; one of {', '.join(KINDS)} was expected"
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and SHARD_NAME.fullmatch(str(s.get("file"))) and _count(s.get("tokens"))
        for s in shards
    ):
        return "lists shards that are not tokens-NNNNN.bin files with their token counts"
    return None


def _check_documents(documents: np.ndarray, tokens: int) -> None:
    """Refuse a document index that is not (start, end) stream positions in order, inside the stream: a
    damaged documents.bin (packing would cut wrong rows, and the error surface in cu_seqlens)."""
    starts, ends = documents[:, 0], documents[:, 1]
    bad = (starts < 0) | (ends < starts) | (ends > tokens)
    bad[1:] |= starts[1:] < ends[:-1]
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise InvalidValueError(
            f"documents.bin: document {index} spans {documents[index].tolist()}, not (start ≤ end) stream "
            f"positions after the one before it within the {tokens:,} tokens (damaged or edited; prepare "
            f"the dataset again)"
        )


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
        check_text_source(path)
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
        _check_documents(self.documents, len(self.stream))
        parts = document_parts(self.documents, self.fractions)
        return {name: Pieces(self.stream, parts[name], seq_len) for name in SPLITS}


__all__ = ["MANIFEST", "PreparedDataset", "Source", "TextData", "is_prepared", "prepare"]

"""Documents for packed training: where they come from, how they are split, and how rows are packed."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from tokenmix.data.documents import (
    SEPARATOR,
    cu_seqlens_of,
    embedded_documents,
    join_documents,
    load_documents,
    packed_rows,
    packed_stream,
    pieces,
    split_documents,
)
from tokenmix.data.mqar import IGNORE
from tokenmix.data.text import embedded_corpus


def test_the_embedded_corpus_is_its_chapters():
    documents = embedded_documents()
    assert len(documents) == 135
    assert all(d.startswith(f"CHAPTER {i}.".encode()) for i, d in enumerate(documents, 1))
    assert b"Call me Ishmael" in documents[0] and documents[-1].endswith(b"five thousand years ago.")
    assert sum(map(len, documents)) > 0.99 * len(embedded_corpus())


def test_directories_and_jsonl_files_are_documents(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_bytes(b"second")
    (tmp_path / "docs" / "a.txt.gz").write_bytes(gzip.compress("first é".encode()))
    (tmp_path / "docs" / ".hidden").write_bytes(b"skipped")
    assert load_documents(tmp_path / "docs") == ["first é".encode(), b"second"]
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two ✓"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    assert load_documents(tmp_path / "d.jsonl") == [b"one", "two ✓".encode()]
    # a JSON string may hold U+2028 and U+0085 raw: records end at "\n" only
    (tmp_path / "sep.jsonl").write_text(json.dumps({"text": "a\u2028b\u0085c"}, ensure_ascii=False) + "\n")
    assert load_documents(tmp_path / "sep.jsonl") == ["a\u2028b\u0085c".encode()]
    (tmp_path / "plain.txt").write_bytes(b"all of it")
    assert load_documents(tmp_path / "plain.txt") == [b"all of it"]
    assert join_documents([b"a", b"b"]) == b"a" + SEPARATOR + b"b"


def test_bad_documents_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match="line 2 has no string field 'text'"):
        load_documents(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"\n')
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        load_documents(tmp_path / "broken.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        load_documents(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(tmp_path / "missing.jsonl")


def test_split_is_contiguous_and_complete():
    documents = [bytes([65 + i]) * (10 + i) for i in range(20)]
    splits = split_documents(documents)
    assert b"".join(b"".join(splits[name]) for name in ("train", "val", "test")) == b"".join(documents)
    assert all(splits[name] for name in ("train", "val", "test"))


def owner(documents, row_inputs, row_targets):
    """Each (inputs, targets) segment must be consecutive bytes of one document."""
    text = bytes(row_inputs.tolist())
    following = bytes([t for t in row_targets.tolist() if t != IGNORE])
    joined = text + following[-1:] if following else text
    return any(joined in document for document in documents)


def test_packed_rows_hold_whole_documents_and_are_a_function_of_the_generator():
    documents = [bytes([97 + i % 26]) * 3 + bytes(range(48, 48 + (5 + 7 * i) % 40)) for i in range(30)]
    parts = pieces(documents, 16)
    inputs, targets, segments = packed_rows(parts, 16, 4, torch.Generator().manual_seed(1))
    again = packed_rows(parts, 16, 4, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip((inputs, targets, segments), again, strict=True))
    assert inputs.shape == targets.shape == segments.shape == (4, 16)
    for row in range(4):
        for segment in segments[row].unique():
            where = segments[row] == segment
            real = targets[row][where] != IGNORE
            # the targets are the inputs shifted by one inside the document
            assert torch.equal(targets[row][where][:-1][real[:-1]], inputs[row][where][1:][real[:-1]])
            assert owner(documents, inputs[row][where], targets[row][where])


def test_packed_stream_covers_the_documents_in_order():
    documents = [b"abcdefgh", b"ij", b"klmnopqrstuvwxyz0123"]
    inputs, targets, segments = packed_stream(pieces(documents, 8), 8)
    positions = b"".join(d[:-1] for d in documents)  # a document's last byte is no input
    assert bytes(inputs.flatten().tolist()) == positions[: inputs.numel()]
    assert segments[0].tolist() == [0] * 7 + [1]  # "abcdefg", then "i" of the next document
    assert targets[0].tolist()[:7] == list(b"bcdefgh") and targets[0, 7] == ord("j")


def test_cu_seqlens_of_rows_of_segments():
    segments = torch.tensor([[0, 0, 1, 1], [0, 1, 2, 2]])
    assert cu_seqlens_of(segments).tolist() == [0, 2, 4, 5, 6, 8]

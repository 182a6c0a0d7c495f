"""Token streams read in place: windows across shard boundaries, and packed pieces from a document index
equal to those cut from the documents themselves (``documents.pieces``, the in-memory oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmix.data.documents import pieces, split_documents
from tokenmix.data.stream import Pieces, TokenStream, document_parts


def test_a_stream_over_shards_reads_any_window_as_their_concatenation():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 65536, size, dtype=np.uint16) for size in (7, 1, 30, 0, 12)]
    whole = np.concatenate(arrays).astype(np.int64)
    stream = TokenStream(arrays)
    assert len(stream) == len(whole)
    for _ in range(200):
        start, end = sorted(rng.integers(0, len(whole) + 1, 2))
        window = stream[start:end]
        assert window.dtype == torch.int64 and torch.equal(window, torch.from_numpy(whole[start:end]))
    view = stream.view(5, 40)
    assert len(view) == 35 and torch.equal(view[3:20], torch.from_numpy(whole[8:25]))
    with pytest.raises(IndexError):
        stream[::2]


@pytest.mark.parametrize("seq_len", [1, 3, 16])
def test_pieces_from_the_index_are_the_pieces_of_the_documents(seq_len):
    rng = np.random.default_rng(seq_len)
    documents = [bytes(rng.integers(0, 256, int(n), dtype=np.uint8)) for n in rng.integers(1, 60, 40)]
    documents[3] = b"x"  # a one-byte document: one piece, no target
    gap = 3  # what lies between documents in the stream (a separator), never in a piece
    stream = np.frombuffer(b"---".join(documents), dtype=np.uint8)
    starts = np.cumsum([0, *(len(d) + gap for d in documents[:-1])])
    ranges = np.stack((starts, starts + [len(d) for d in documents]), axis=1)
    parts = document_parts(ranges, (0.8, 0.1, 0.1))
    for name, expected_documents in split_documents(documents, (0.8, 0.1, 0.1)).items():
        ours = Pieces(TokenStream([stream]), parts[name], seq_len)
        expected = pieces(expected_documents, seq_len)
        assert len(ours) == len(expected) and ours.positions() == sum(map(len, expected_documents))
        for mine, theirs in zip(ours, expected, strict=True):
            assert torch.equal(mine, theirs.long())
        assert torch.equal(ours[len(ours) - 1], expected[-1].long())

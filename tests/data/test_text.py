from __future__ import annotations

import gzip

import pytest
import torch

from tokenmix.data import embedded_corpus, load_corpus, random_windows, split
from tokenmix.data.text import check_long_enough


def test_embedded_corpus_is_moby_dick():
    data = embedded_corpus()
    assert len(data) > 1_000_000
    assert data.startswith(b"CHAPTER 1. Loomings.") and b"Call me Ishmael." in data[:200]
    assert load_corpus() == data


def test_files_and_gzip_files_load(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello \xff bytes")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"zipped"))
    assert load_corpus(tmp_path / "a.txt") == b"hello \xff bytes"
    assert load_corpus(tmp_path / "b.txt.gz") == b"zipped"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")


def test_split_is_contiguous_deterministic_and_complete():
    data = bytes(range(256)) * 40  # 10240 bytes
    parts = split(data)
    assert [len(parts[name]) for name in ("train", "val", "test")] == [9216, 512, 512]
    assert bytes(torch.cat(list(parts.values())).tolist()) == data
    assert all(torch.equal(parts[k], split(data)[k]) for k in parts)
    with pytest.raises(ValueError, match="summing to 1"):
        split(data, (0.5, 0.2, 0.2))


def test_windows_are_next_byte_pairs():
    data = torch.arange(100, dtype=torch.uint8)
    inputs, targets = random_windows(data, 16, 8, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (8, 16) and inputs.dtype == torch.int64
    assert torch.equal(targets[:, :-1], inputs[:, 1:]) and torch.equal(targets[:, -1], inputs[:, -1] + 1)
    again = random_windows(data, 16, 8, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs)


def test_too_short_for_the_sequence_length_says_so():
    parts = split(b"x" * 1000)
    with pytest.raises(ValueError, match="the val split has 50 tokens, too short for seq_len=64"):
        check_long_enough(parts, 64)
    with pytest.raises(ValueError, match="too short for seq_len=16"):
        random_windows(torch.zeros(10, dtype=torch.uint8), 16, 2, torch.Generator())

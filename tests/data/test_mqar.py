from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tokenmix.data.mqar import FILLER, IGNORE, mqar_batch


@given(
    num_pairs=st.integers(1, 8),
    extra_vocab=st.integers(0, 20),
    extra_len=st.integers(0, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_query_asks_for_the_value_of_its_key(num_pairs, extra_vocab, extra_len, seed):
    vocab_size, seq_len = 2 * num_pairs + 2 + extra_vocab, 3 * num_pairs + extra_len
    inputs, targets = mqar_batch(4, vocab_size, seq_len, num_pairs, torch.Generator().manual_seed(seed))
    assert inputs.shape == targets.shape == (4, seq_len) and inputs.dtype == torch.int64
    half = vocab_size // 2
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
        keys, values = row_inputs[0 : 2 * num_pairs : 2], row_inputs[1 : 2 * num_pairs : 2]
        assert len(set(keys)) == num_pairs and all(0 < k < half for k in keys)
        assert all(half <= v < vocab_size for v in values)
        assert all(t == IGNORE for t in row_targets[: 2 * num_pairs])
        queries = [(row_inputs[i], t) for i, t in enumerate(row_targets) if t != IGNORE]
        assert sorted(q for q, _ in queries) == sorted(keys)  # each key asked exactly once
        answer = dict(zip(keys, values, strict=True))
        assert all(answer[q] == t for q, t in queries)
        rest = [
            x for i, x in enumerate(row_inputs[2 * num_pairs :]) if row_targets[2 * num_pairs + i] == IGNORE
        ]
        assert all(x == FILLER for x in rest)


def test_impossible_settings_are_named():
    generator = torch.Generator()
    with pytest.raises(ValueError, match="vocab_size=8 leaves 3 keys for num_pairs=4"):
        mqar_batch(1, 8, 64, 4, generator)
    with pytest.raises(ValueError, match="seq_len=10 cannot hold 4 pairs"):
        mqar_batch(1, 64, 10, 4, generator)

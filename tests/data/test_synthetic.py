from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmix.data.mqar import IGNORE
from tokenmix.data.synthetic import NOISE, induction_batch, selective_copy_batch


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(2, 10),
    extra_vocab=st.integers(0, 12),
    extra_len=st.integers(0, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_induction_answers_are_what_followed_the_token_before(num_tokens, extra_vocab, extra_len, seed):
    vocab_size, seq_len = max(4, 2 * num_tokens) + extra_vocab, 2 * num_tokens + extra_len
    inputs, targets = induction_batch(3, vocab_size, seq_len, num_tokens, _generator(seed))
    assert inputs.shape == targets.shape == (3, seq_len) and inputs.dtype == torch.int64
    for row, answers in zip(inputs.tolist(), targets.tolist(), strict=True):
        asked = [t for t, answer in enumerate(answers) if answer != IGNORE]
        assert len(asked) == num_tokens - 1 and asked == list(range(asked[0], asked[0] + num_tokens - 1))
        for t in asked:  # the oracle: the one earlier occurrence of this token, and what came after it
            earlier = [j for j in range(t) if row[j] == row[t]]
            assert len(earlier) == 1 and answers[t] == row[earlier[0] + 1]
        assert all(0 <= x < vocab_size for x in row)


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(1, 10),
    vocab_size=st.integers(3, 40),
    extra_len=st.integers(0, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_selective_copy_asks_for_the_content_in_order(num_tokens, vocab_size, extra_len, seed):
    seq_len = 2 * num_tokens + extra_len
    inputs, targets = selective_copy_batch(3, vocab_size, seq_len, num_tokens, _generator(seed))
    marker = vocab_size - 1
    for row, answers in zip(inputs.tolist(), targets.tolist(), strict=True):
        body = row[: seq_len - num_tokens]
        assert row[seq_len - num_tokens :] == [marker] * num_tokens and marker not in body
        content = [x for x in body if x != NOISE]
        assert [a for a in answers if a != IGNORE] == content and len(content) == num_tokens
        assert answers[: seq_len - num_tokens] == [IGNORE] * (seq_len - num_tokens)


@pytest.mark.parametrize("draw", [induction_batch, selective_copy_batch])
def test_a_seed_draws_the_same_batch(draw):
    a, b, c = (draw(8, 32, 40, 6, _generator(seed)) for seed in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_impossible_settings_are_named():
    with pytest.raises(ValueError, match="vocab_size=10 leaves 5 segment tokens for num_tokens=8"):
        induction_batch(1, 10, 64, 8, _generator(0))
    with pytest.raises(ValueError, match="seq_len=10 cannot hold two copies of 8 tokens"):
        induction_batch(1, 32, 10, 8, _generator(0))
    with pytest.raises(ValueError, match="seq_len=15 cannot hold 8 tokens and their 8 markers"):
        selective_copy_batch(1, 32, 15, 8, _generator(0))
    with pytest.raises(ValueError, match="vocab_size=2 leaves no content token"):
        selective_copy_batch(1, 2, 16, 4, _generator(0))

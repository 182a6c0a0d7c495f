from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmix.data import listops
from tokenmix.data.listops import decode, listops_batch


def evaluate(words: list[str]) -> int:
    """An independent evaluator of ListOps text: a stack machine over the words (LRA's semantics: MED
    is int(np.median), SM the sum modulo 10)."""
    operations = {
        "[MIN": min,
        "[MAX": max,
        "[MED": lambda values: int(statistics.median(values)),
        "[SM": lambda values: sum(values) % 10,
    }
    stack: list = []
    for word in words:
        if word == "]":
            values = []
            while not isinstance(stack[-1], str):
                values.append(stack.pop())
            stack.append(operations[stack.pop()](values))
        elif word in operations:
            stack.append(word)
        else:
            stack.append(int(word))
    assert len(stack) == 1, words
    return stack[0]


@settings(max_examples=25, deadline=None)
@given(seq_len=st.integers(8, 160), seed=st.integers(0, 2**31 - 1))
def test_labels_are_the_values_of_the_expressions(seq_len, seed):
    tokens, labels = listops_batch(6, seq_len, torch.Generator().manual_seed(seed))
    assert tokens.shape == (6, seq_len) and labels.shape == (6,)
    for row, label in zip(tokens.tolist(), labels.tolist(), strict=True):
        words = decode(row)
        assert max(4, seq_len // 4) <= len(words) <= seq_len
        assert row[len(words) :] == [listops.PAD] * (seq_len - len(words))  # padded on the right only
        assert words[0] in listops.OPERATORS and evaluate(words) == label


def test_every_operator_and_class_is_drawn_and_a_seed_repeats():
    tokens, labels = listops_batch(400, 128, torch.Generator().manual_seed(0))
    assert set(labels.tolist()) == set(range(10))
    assert all(listops.TOKEN[op] in tokens for op in listops.OPERATORS)
    again = listops_batch(400, 128, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again[0]) and torch.equal(labels, again[1])


def test_median_of_an_even_count_rounds_down():
    assert listops.tree_value(("[MED", [1, 2])) == 1 == evaluate(["[MED", "1", "2", "]"])
    assert listops.tree_value(("[MED", [3, 8, 1, 6])) == 4


def test_impossible_settings_are_named():
    with pytest.raises(ValueError, match="seq_len=3 holds no operation"):
        listops_batch(1, 3, torch.Generator())
    with pytest.raises(ValueError, match="min_length must lie in"):
        listops_batch(1, 16, torch.Generator(), min_length=17)

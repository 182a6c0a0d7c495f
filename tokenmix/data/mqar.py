"""Multi-query associative recall (Arora et al. 2023, Zoology): key-value pairs, then queries.

A sequence of ``seq_len`` tokens starts with ``num_pairs`` pairs ``k₁ v₁ k₂ v₂ …`` (distinct keys from the
lower half of the vocabulary, values from the upper half); the rest holds each key once more, in a
random order and at random positions, between filler tokens (0). The target at a query key is its value;
every other position is ignored (−100), so accuracy measures recall alone.
"""

from __future__ import annotations

import torch

from ..errors import InvalidValueError

IGNORE = -100
FILLER = 0


def check_mqar(vocab_size: int, seq_len: int, num_pairs: int) -> None:
    if num_pairs < 1:
        raise InvalidValueError(f"num_pairs must be ≥ 1, got {num_pairs}")
    if vocab_size // 2 - 1 < num_pairs:
        raise InvalidValueError(
            f"vocab_size={vocab_size} leaves {vocab_size // 2 - 1} keys for num_pairs={num_pairs}; "
            f"use vocab_size ≥ {2 * num_pairs + 2}"
        )
    if seq_len < 3 * num_pairs:
        raise InvalidValueError(
            f"seq_len={seq_len} cannot hold {num_pairs} pairs and their queries; "
            f"use seq_len ≥ {3 * num_pairs}"
        )


def mqar_batch(
    batch_size: int, vocab_size: int, seq_len: int, num_pairs: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, seq_len) and targets (B, seq_len), int64, drawn from ``generator``."""
    check_mqar(vocab_size, seq_len, num_pairs)
    half = vocab_size // 2
    rows = torch.arange(batch_size)[:, None]
    # Keys 1..half-1 (0 is the filler), values half..vocab_size-1.
    keys = torch.rand(batch_size, half - 1, generator=generator).argsort(1)[:, :num_pairs] + 1
    values = torch.randint(half, vocab_size, (batch_size, num_pairs), generator=generator)
    inputs = torch.full((batch_size, seq_len), FILLER, dtype=torch.long)
    targets = torch.full((batch_size, seq_len), IGNORE, dtype=torch.long)
    inputs[:, 0 : 2 * num_pairs : 2], inputs[:, 1 : 2 * num_pairs : 2] = keys, values
    query_slots = seq_len - 2 * num_pairs
    positions = torch.rand(batch_size, query_slots, generator=generator).argsort(1)[:, :num_pairs]
    positions = positions.sort(1).values + 2 * num_pairs
    order = torch.rand(batch_size, num_pairs, generator=generator).argsort(1)
    inputs[rows, positions] = keys.gather(1, order)
    targets[rows, positions] = values.gather(1, order)
    return inputs, targets

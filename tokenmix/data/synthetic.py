"""Synthetic sequence tasks beside MQAR (``tokenmix.data.mqar``): induction heads and selective copying.

Both draw (inputs, targets) int64 rows of ``seq_len`` tokens from a generator; targets are −100 (ignored)
everywhere but where the task asks for an answer, so accuracy measures the task alone.

- **Induction** (Olsson et al. 2022): a segment of ``num_tokens`` distinct tokens appears twice at random
  places among noise. Within the second copy each token is predicted from the first copy: find where the
  current token occurred before and read what followed it. The offset between the copies differs from row
  to row, so no fixed position pattern solves it. Noise comes from the lower half of the vocabulary,
  segment tokens from the upper half: the lookup is unambiguous. Chance: 1 / (vocab_size − vocab_size//2).
- **Selective copying** (Gu & Dao 2023, Mamba §3.1): ``num_tokens`` content tokens at random positions of
  the first ``seq_len − num_tokens`` positions, the rest noise (0); then ``num_tokens`` markers. At the
  j-th marker the target is the j-th content token. Chance: 1 / (vocab_size − 2).
"""

from __future__ import annotations

import torch

from ..errors import InvalidValueError
from .mqar import IGNORE

NOISE = 0  # selective copying's blank


def check_induction(vocab_size: int, seq_len: int, num_tokens: int) -> None:
    if num_tokens < 2:
        raise InvalidValueError(
            f"num_tokens must be ≥ 2 for induction (a segment to repeat), got {num_tokens}"
        )
    if vocab_size - vocab_size // 2 < num_tokens or vocab_size < 4:
        raise InvalidValueError(
            f"vocab_size={vocab_size} leaves {vocab_size - vocab_size // 2} segment tokens for "
            f"num_tokens={num_tokens} distinct ones; use vocab_size ≥ {max(4, 2 * num_tokens)}"
        )
    if seq_len < 2 * num_tokens:
        raise InvalidValueError(
            f"seq_len={seq_len} cannot hold two copies of {num_tokens} tokens; use seq_len ≥ {2 * num_tokens}"
        )


def induction_batch(
    batch_size: int, vocab_size: int, seq_len: int, num_tokens: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, seq_len), int64: the segment's first copy starts in the first half, its
    second in the second half (the copies never overlap)."""
    check_induction(vocab_size, seq_len, num_tokens)
    half = vocab_size // 2
    inputs = torch.randint(0, half, (batch_size, seq_len), generator=generator)  # noise
    segment = torch.rand(batch_size, vocab_size - half, generator=generator).argsort(1)[:, :num_tokens] + half
    first_half = seq_len // 2
    # First copy starts in [0, first_half − num_tokens] (clamped to 0 when the half is too short), the
    # second in [max(first end, first_half), seq_len − num_tokens].
    first = _uniform(0, max(0, first_half - num_tokens), batch_size, generator)
    low = torch.maximum(first + num_tokens, torch.full_like(first, first_half)).clamp_max(
        seq_len - num_tokens
    )
    second = low + (torch.rand(batch_size, generator=generator) * (seq_len - num_tokens - low + 1)).long()
    offsets = torch.arange(num_tokens)
    rows = torch.arange(batch_size)[:, None]
    inputs[rows, first[:, None] + offsets] = segment
    inputs[rows, second[:, None] + offsets] = segment
    targets = torch.full_like(inputs, IGNORE)
    # Position of the second copy's k-th token predicts its (k+1)-th: the answer at the k-th token.
    targets[rows, second[:, None] + offsets[:-1]] = segment[:, 1:]
    return inputs, targets


def check_selective_copy(vocab_size: int, seq_len: int, num_tokens: int) -> None:
    if num_tokens < 1:
        raise InvalidValueError(f"num_tokens must be ≥ 1, got {num_tokens}")
    if vocab_size < 3:
        raise InvalidValueError(
            f"vocab_size={vocab_size} leaves no content token beside the noise and the marker; use ≥ 3"
        )
    if seq_len < 2 * num_tokens:
        raise InvalidValueError(
            f"seq_len={seq_len} cannot hold {num_tokens} tokens and their {num_tokens} markers; "
            f"use seq_len ≥ {2 * num_tokens}"
        )


def selective_copy_batch(
    batch_size: int, vocab_size: int, seq_len: int, num_tokens: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, seq_len), int64: content tokens in [1, vocab_size − 1), the marker is
    vocab_size − 1."""
    check_selective_copy(vocab_size, seq_len, num_tokens)
    marker, body = vocab_size - 1, seq_len - num_tokens
    content = torch.randint(1, marker, (batch_size, num_tokens), generator=generator)
    positions = torch.rand(batch_size, body, generator=generator).argsort(1)[:, :num_tokens].sort(1).values
    inputs = torch.full((batch_size, seq_len), NOISE, dtype=torch.long)
    inputs[torch.arange(batch_size)[:, None], positions] = content
    inputs[:, body:] = marker
    targets = torch.full_like(inputs, IGNORE)
    targets[:, body:] = content
    return inputs, targets


def _uniform(low: int, high: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` integers uniform in [low, high]."""
    return torch.randint(low, high + 1, (count,), generator=generator)

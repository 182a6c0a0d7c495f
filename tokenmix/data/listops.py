"""ListOps (Nangia & Bowman 2018, as Long Range Arena generates it): nested lists of operations on digits,
10-way classification of the expression's value.

``[MAX 2 9 [MIN 4 7 ] 0 ]`` is 9. Operators: MAX, MIN, MED (the median, rounded down: LRA's
``int(np.median)``), SM (the sum modulo 10). The generator follows LRA's: a node is an operator with
2…``max_args`` arguments with probability 0.25 below ``max_depth``, else a digit; trees whose token count
lies outside [``min_length``, ``seq_len``] are drawn again. Sequences are right-padded with 0.

Tokens: 0 padding, 1–10 the digits 0–9, 11 ``[MIN``, 12 ``[MAX``, 13 ``[MED``, 14 ``[SM``, 15 ``]``.
"""

from __future__ import annotations

import random

import torch

from ..errors import InvalidValueError

PAD = 0
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
VOCAB = (
    "<pad>",
    *(str(digit) for digit in range(10)),
    *OPERATORS,
    CLOSE,
)
TOKEN = {word: index for index, word in enumerate(VOCAB)}
VOCAB_SIZE = len(VOCAB)
NUM_CLASSES = 10
OPERATOR_P = 0.25  # LRA's VALUE_P: an inner node with this probability (below max_depth)

Tree = int | tuple[str, list["Tree"]]


def _draw_tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> Tree:
    if depth < max_depth and rng.random() < OPERATOR_P:
        count = rng.randint(2, max_args)
        return rng.choice(OPERATORS), [_draw_tree(rng, depth + 1, max_depth, max_args) for _ in range(count)]
    return rng.randrange(10)


def tree_value(tree: Tree) -> int:
    """The value of a tree, computed on the tree (tests check it against ``evaluate`` on its tokens)."""
    if isinstance(tree, int):
        return tree
    operator, arguments = tree
    values = sorted(tree_value(argument) for argument in arguments)
    if operator == "[MIN":
        return values[0]
    if operator == "[MAX":
        return values[-1]
    if operator == "[SM":
        return sum(values) % 10
    middle = len(values) // 2  # MED, rounded down
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) // 2


def tree_words(tree: Tree) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    operator, arguments = tree
    return [operator, *(word for argument in arguments for word in tree_words(argument)), CLOSE]


def check_listops(seq_len: int, min_length: int, max_depth: int, max_args: int) -> None:
    if max_depth < 1 or max_args < 2:
        raise InvalidValueError(f"max_depth must be ≥ 1 and max_args ≥ 2, got {max_depth} and {max_args}")
    if seq_len < 4:
        raise InvalidValueError(
            f"seq_len={seq_len} holds no operation (the shortest takes 4 tokens); use ≥ 4"
        )
    if not 1 <= min_length <= seq_len:
        raise InvalidValueError(f"min_length must lie in [1, seq_len={seq_len}], got {min_length}")


def listops_batch(
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
    *,
    min_length: int | None = None,
    max_depth: int = 6,
    max_args: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, seq_len) int64, right-padded with ``PAD``, and labels (B,) in [0, 10).

    ``min_length`` defaults to ``seq_len // 4`` (LRA keeps expressions of 500–2000 tokens, at most four
    to one); a root that is one digit is always drawn again."""
    min_length = max(4, seq_len // 4) if min_length is None else min_length
    check_listops(seq_len, min_length, max_depth, max_args)
    rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
    tokens = torch.full((batch_size, seq_len), PAD, dtype=torch.long)
    labels = torch.empty(batch_size, dtype=torch.long)
    for row in range(batch_size):
        while True:
            tree = _draw_tree(rng, 0, max_depth, max_args)
            words = tree_words(tree)
            if not isinstance(tree, int) and min_length <= len(words) <= seq_len:
                break
        tokens[row, : len(words)] = torch.tensor([TOKEN[word] for word in words])
        labels[row] = tree_value(tree)
    return tokens, labels


def decode(tokens: list[int]) -> list[str]:
    """Token ids (padding dropped) as words."""
    return [VOCAB[token] for token in tokens if token != PAD]

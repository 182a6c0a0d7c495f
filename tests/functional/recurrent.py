"""The recurrent convention (docs/spec.md §7) checked the same way for every op that has it: a sequence
fed in pieces, each call from the state the previous one returned, with left padding of different
lengths per row, equals each row's own causal op — outputs and every gradient."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from tests.reference import assert_close


def check_pieces(
    op: Callable[..., torch.Tensor],
    sequences: list[torch.Tensor],
    parameters: list[torch.Tensor],
    cuts: list[int],
    lengths: list[int],
    tol: float,
) -> None:
    """``op(*sequences, *parameters, attention_mask=..., initial_state=..., output_final_state=...)``,
    sequences (B, N, …) with row b's last ``lengths[b]`` positions real, fed in the pieces ``cuts``
    (0 = cuts[0] < … < cuts[-1] = N), against ``op(*row_alone, *parameters)`` per row."""
    length = sequences[0].shape[1]
    mask = torch.arange(length)[None, :] >= (length - torch.tensor(lengths))[:, None]
    leaves = [
        torch.where(mask.view(*mask.shape, *[1] * (s.dim() - 2)), s, torch.full_like(s, 1e3)).requires_grad_()
        for s in sequences
    ]  # padding is anything finite
    state, pieces = None, []
    for start, end in itertools.pairwise(cuts):
        out, state = op(
            *(s[:, start:end] for s in leaves),
            *parameters,
            attention_mask=mask[:, start:end],
            initial_state=state,
            output_final_state=True,
        )
        pieces.append(out)
    joined = torch.cat(pieces, 1)
    assert torch.isfinite(joined).all()
    grad = torch.randn_like(joined) * mask.view(*mask.shape, *[1] * (joined.dim() - 2))
    got = torch.autograd.grad(joined, [*leaves, *parameters], grad)
    for row, real in enumerate(lengths):
        own = [s[row : row + 1, length - real :].detach().clone().requires_grad_() for s in sequences]
        expected = op(*own, *parameters)
        what = f"{getattr(op, '__name__', op)} row {row} cuts {cuts}"
        assert_close(joined[row, length - real :], expected[0], tol, what=what)
        want = torch.autograd.grad(expected, [*own, *parameters], grad[row : row + 1, length - real :])
        for index, (leaf, expected_grad) in enumerate(zip(got[: len(own)], want[: len(own)], strict=True)):
            assert_close(leaf[row, length - real :], expected_grad[0], 10 * tol, what=f"{what} input {index}")
            assert torch.all(leaf[row, : length - real] == 0)  # padding reaches nothing
    # Parameter gradients: the sum over rows of each row's own.
    for index, parameter in enumerate(parameters):
        total = sum(
            torch.autograd.grad(
                op(*[s[row : row + 1, length - real :] for s in sequences], *parameters),
                parameter,
                grad[row : row + 1, length - real :],
            )[0]
            for row, real in enumerate(lengths)
        )
        assert_close(got[len(leaves) + index], total, 10 * tol, what=f"parameter {index}")

"""What the table of ops (tests/functional/ops.py) promises: it lists every public op, and every op in it
equals its float64 oracle, forward and backward, causal and bidirectional, with padding."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.functional.ops import OPS
from tests.reference import assert_matches
from tokenmix import functional as F


def test_every_public_op_is_in_the_table():
    """A public op (a function of tokenmix.functional) missing from the table would be missed by every
    test that parametrises over it: packing, compile, signatures, the oracle below."""
    public = {name for name in F.__all__ if inspect.isfunction(getattr(F, name))}
    listed = {case.op.__name__ for case in OPS.values()} | {
        form for case in OPS.values() for form in case.decoding
    }
    assert public == listed, (sorted(public - listed), sorted(listed - public))


def _rows(mask: torch.Tensor, out: torch.Tensor, dim: int) -> torch.Tensor:
    """The (B, N …) mask of real positions as the output's shape, N at ``dim``."""
    shape = [mask.shape[0]] + [1] * (out.dim() - 1)
    shape[dim : dim + mask.dim() - 1] = mask.shape[1:]
    return mask.view(shape).expand(out.shape)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", [name for name, case in OPS.items() if case.oracle is not None])
def test_every_op_equals_its_oracle(name, causal):
    case = OPS[name]
    if causal and not case.causal:
        pytest.skip(f"{name} has no causal form")
    generator = torch.Generator().manual_seed(sorted(OPS).index(name) + 50 * causal)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    sequences, parameters = case.inputs(randn, 2, 7)
    first, dim = sequences[0]
    positions = first.shape[dim : dim + case.position_dims]
    mask = torch.rand(first.shape[0], *positions, generator=generator) > 0.3
    mask.view(2, -1)[:, 0] = True  # a real position in each row
    tensors = [t.requires_grad_() for t, _ in sequences] + [p.requires_grad_() for p in parameters]
    out = case.call(causal)(*tensors, attention_mask=mask)
    expected = case.oracle(*tensors, causal=causal, attention_mask=mask, **case.options)
    inputs = {f"input {i}": tensor for i, tensor in enumerate(tensors)}
    assert_matches(out, expected, inputs, 1e-9, rows=_rows(mask, out, dim), generator=generator, what=name)

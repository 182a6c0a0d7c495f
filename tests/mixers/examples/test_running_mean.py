"""The worked example's own tests (docs/guide.md, "Add a mixer"): its op against a float64 oracle written
from the equation, forward and backward, and its state continuing a sequence. Everything else it must do
is checked by the all-mixer tests it joins by being registered."""

from __future__ import annotations

import pytest
import torch

from tests.mixers.examples.running_mean import running_mean
from tests.reference import assert_close
from tokenmix.errors import InvalidValueError


def oracle(v: torch.Tensor, causal: bool, mask: torch.Tensor) -> torch.Tensor:
    """m_t: the mean of v_s over the real s ≤ t (causal) or every real s, one position at a time."""
    rows = []
    for b in range(v.shape[0]):
        means = []
        for t in range(v.shape[1]):
            seen = [v[b, s] for s in range(v.shape[1]) if mask[b, s] and (s <= t or not causal)]
            means.append(torch.stack(seen).mean(0) if seen else torch.zeros_like(v[b, t]))
        rows.append(torch.stack(means))
    return torch.stack(rows)


@pytest.mark.parametrize("causal", [False, True])
def test_the_op_is_the_equation_forward_and_backward(causal):
    generator = torch.Generator().manual_seed(int(causal))
    v = torch.randn(2, 9, 4, generator=generator, dtype=torch.float64)
    mask = torch.rand(2, 9, generator=generator) > 0.4
    mask[:, 4] = True
    v[~mask] = float("nan")  # padding is selected away: its NaN reaches no real row
    grad = torch.randn(2, 9, 4, generator=generator, dtype=torch.float64)
    results = []
    for op in (
        lambda x: running_mean(x, causal=causal, attention_mask=mask),
        lambda x: oracle(x, causal, mask),
    ):
        x = v.detach().requires_grad_()
        out = op(x)
        results.append((out[mask], torch.autograd.grad(out[mask], x, grad[mask])[0][mask]))
    for ours, expected in zip(*results, strict=True):
        assert_close(ours, expected, 1e-12)


def test_the_state_continues_a_sequence_where_it_stopped():
    generator = torch.Generator().manual_seed(2)
    v = torch.randn(3, 10, 4, generator=generator)
    whole = running_mean(v, causal=True)
    first, state = running_mean(v[:, :6], causal=True, output_final_state=True)
    rest, _ = running_mean(v[:, 6:], causal=True, initial_state=state, output_final_state=True)
    assert_close(torch.cat([first, rest], 1), whole, 1e-6)


def test_bad_input_names_the_argument():
    with pytest.raises(InvalidValueError, match="causal=True"):
        running_mean(torch.zeros(1, 3, 2), output_final_state=True)
    with pytest.raises(InvalidValueError, match=r"v must have shape \(B, N, D\)"):
        running_mean(torch.zeros(3, 2))

"""Renamed ops and state types keep their old spelling working, with a DeprecationWarning that names the
new one, and compute exactly what the new one does."""

from __future__ import annotations

import pytest
import torch

import tokenmix.functional as F


def _cache_inputs(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    q = torch.randn(2, 2, 3, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 7, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.rand(2, 7, generator=gen) > 0.3


@pytest.mark.parametrize(
    "old,new",
    [
        ("softmax_attention_step", "softmax_attention_cached"),
        ("pointwise_attention_step", "pointwise_attention_cached"),
        ("aft_cached", "aft_full_cached"),
    ],
)
def test_old_cached_names_warn_and_equal_the_new(old, new):
    gen = torch.Generator().manual_seed(len(old))
    q, k, v, mask = _cache_inputs(gen)
    if new == "aft_full_cached":  # (B, T, D) over (B, L, D) with biases (B, T, L)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        args = (q, k, v, torch.randn(2, 3, 7, generator=gen, dtype=torch.float64))
    else:
        args = (q, k, v)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; use {new}"):
        got = getattr(F, old)(*args, key_mask=mask)
    assert torch.equal(got, getattr(F, new)(*args, key_mask=mask))


@pytest.mark.parametrize("op", ["lightconv", "dynamic_conv"])
def test_a_bare_tensor_conv_state_warns_and_equals_the_named_state(op):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(*((2, 3) if op == "lightconv" else (2, 5, 2, 3)), generator=gen, dtype=torch.float64)
    window = torch.randn(2, 2, 4, generator=gen, dtype=torch.float64)
    call = getattr(F, op)
    expected, state = call(
        x, weight, causal=True, initial_state=F.ConvWindowState(window), output_final_state=True
    )
    assert isinstance(state, F.ConvWindowState) and state.inputs.shape == (2, 2, 4)
    with pytest.warns(DeprecationWarning, match="ConvWindowState"):
        got = call(x, weight, causal=True, initial_state=window)
    assert torch.equal(got, expected)


def test_aft_simple_state_is_named_and_a_plain_tuple_still_works_with_a_warning():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 6, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    _, state = F.aft_simple(q[:, :4], k[:, :4], v[:, :4], causal=True, output_final_state=True)
    assert isinstance(state, F.AFTSimpleState) and state.max.shape == (2, 3)
    named = F.aft_simple(q[:, 4:], k[:, 4:], v[:, 4:], causal=True, initial_state=state)
    with pytest.warns(DeprecationWarning, match="AFTSimpleState"):  # the NamedTuple it was before
        plain = F.aft_simple(q[:, 4:], k[:, 4:], v[:, 4:], causal=True, initial_state=(state.max,
                             state.numerator, state.denominator))  # fmt: skip
    assert torch.equal(named, plain)
    with pytest.raises(TypeError, match="initial_state must be the AFTSimpleState"):
        F.aft_simple(q, k, v, causal=True, initial_state=(state.max, state.numerator))

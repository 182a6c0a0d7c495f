"""lightconv and dynamic_conv, both execution paths, against the float64 equation of docs/spec.md §5."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests import reference
from tests.reference import assert_close, assert_matches
from tokenmix.functional import ConvWindowState, conv, dynamic_conv, lightconv

PATHS = {
    "lightconv": (conv.lightconv_window, conv.lightconv_band),
    "dynamic_conv": (conv.dynamic_conv_window, conv.dynamic_conv_band),
}


def random_case(batch, seq_len, heads, per_head, kernel_size, dynamic, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, heads * per_head, generator=gen, dtype=torch.float64).to(dtype)
    shape = (batch, seq_len, heads, kernel_size) if dynamic else (heads, kernel_size)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(batch, seq_len, generator=gen) > 0.3
    return x.requires_grad_(), weight.requires_grad_(), mask, gen


def force_path(op_name: str, path: str):
    """Make the op take one path whatever the length."""
    return mock.patch.dict(conv.BAND_RULE, {op_name: (1, 10**9) if path == "band" else (10**9, 0)})


def check(op_name, case, causal, weight_softmax, masked, path, tol=1e-6):
    x, weight, mask, gen = case
    mask = mask if masked else None
    op, ref = getattr(conv, op_name), getattr(reference, op_name)
    with force_path(op_name, path):
        out = op(x, weight, causal=causal, weight_softmax=weight_softmax, attention_mask=mask)
    expected = ref(x, weight, causal=causal, weight_softmax=weight_softmax, attention_mask=mask)
    rows = None if mask is None else mask[..., None].expand_as(out)
    grads = x.requires_grad and x.dtype == torch.float64
    assert_matches(
        out,
        expected,
        {"x": x, "weight": weight},
        tol,
        rows=rows,
        generator=gen,
        grads=grads,
        what=f"{op_name} {path}",
    )


@given(
    op_name=st.sampled_from(sorted(PATHS)),
    path=st.sampled_from(["window", "band"]),
    batch=st.integers(1, 2),
    seq_len=st.integers(1, 12),
    heads=st.integers(1, 3),
    per_head=st.integers(1, 3),
    kernel_size=st.integers(1, 15),
    causal=st.booleans(),
    weight_softmax=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(
    op_name, path, batch, seq_len, heads, per_head, kernel_size, causal, weight_softmax, masked, seed
):
    case = random_case(batch, seq_len, heads, per_head, kernel_size, op_name == "dynamic_conv", seed)
    check(op_name, case, causal, weight_softmax, masked, path)


@pytest.mark.parametrize("op_name", sorted(PATHS))
@pytest.mark.parametrize("path", ["window", "band"])
def test_every_kernel_size_up_to_63_and_past_the_sequence(op_name, path):
    for kernel_size in [*range(1, 17), 31, 32, 63]:
        case = random_case(1, 9, 2, 2, kernel_size, op_name == "dynamic_conv", seed=kernel_size)
        for causal in (False, True):
            check(op_name, case, causal, weight_softmax=True, masked=kernel_size % 2 == 0, path=path)


@pytest.mark.parametrize("op_name", sorted(PATHS))
@pytest.mark.parametrize("path", ["window", "band"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(op_name, path, causal):
    x, weight, mask, _ = random_case(2, 6, 2, 2, 4, op_name == "dynamic_conv", seed=5)
    op = getattr(conv, op_name)
    with force_path(op_name, path):
        assert torch.autograd.gradcheck(
            lambda x, w: op(x, w, causal=causal, attention_mask=mask), (x, weight)
        )


@pytest.mark.parametrize("op_name", sorted(PATHS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_low_precision(op_name, dtype, tol):
    for path in ("window", "band"):
        case = random_case(2, 20, 2, 4, 7, op_name == "dynamic_conv", seed=6, dtype=dtype)
        x, weight, mask, gen = case
        case = (x.detach(), weight.detach(), mask, gen)
        for causal in (False, True):
            check(op_name, case, causal, True, True, path, tol)
        with force_path(op_name, path):
            assert getattr(conv, op_name)(x, weight).dtype == dtype


def test_default_path_follows_the_measured_rule():
    """band for K ≥ the rule's minimum and N ≤ 4K, window otherwise; both give the same numbers."""
    for op_name, (min_kernel_size, per_tap) in conv.BAND_RULE.items():
        for kernel_size in (min_kernel_size - 1, min_kernel_size):
            for seq_len in (per_tap * kernel_size, per_tap * kernel_size + 1):
                expected = kernel_size >= min_kernel_size and seq_len <= per_tap * kernel_size
                assert conv._use_band(op_name, seq_len, kernel_size) == expected
        x, weight, mask, _ = random_case(
            2, 4 * min_kernel_size + 1, 2, 3, min_kernel_size, op_name == "dynamic_conv", 7
        )
        layout = "(B, N, H, K)" if op_name == "dynamic_conv" else "(H, K)"
        prepared, kernel, heads = conv._prepare(x, weight, mask, True, layout)
        window, band = PATHS[op_name]
        assert_close(window(prepared, kernel, heads, True), band(prepared, kernel, heads, True), 1e-12)


def test_errors_name_the_argument():
    x = torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match=r"H = weight.shape"):
        lightconv(x, torch.randn(4, 3))
    with pytest.raises(ValueError, match="weight must have shape \\(H, K\\)"):
        lightconv(x, torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="kernel_size K"):
        lightconv(x, torch.randn(2, 0))
    with pytest.raises(ValueError, match="weight has N=4"):
        dynamic_conv(x, torch.randn(2, 4, 2, 3))
    with pytest.raises(TypeError, match="dtype"):
        lightconv(x, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        lightconv(x, torch.randn(2, 3), attention_mask=torch.ones(2, 4))


@pytest.mark.parametrize("op", ["lightconv", "dynamic_conv"])
@pytest.mark.parametrize("kernel_size", [1, 3, 6])
@pytest.mark.parametrize("cut", [0, 2, 9])
def test_initial_and_final_state_split_the_causal_op(op, kernel_size, cut):
    """The recurrent convention (docs/spec.md §7): [0, cut) with output_final_state, then [cut, N) from
    that state, equals the causal op over [0, N), outputs and gradients, with padding as zeros."""
    gen = torch.Generator().manual_seed(kernel_size + cut)
    x = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    shape = (2, kernel_size) if op == "lightconv" else (2, 9, 2, kernel_size)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 9, generator=gen) > 0.3
    call = {"lightconv": lightconv, "dynamic_conv": dynamic_conv}[op]

    def weight_of(a, b):
        return weight if op == "lightconv" else weight[:, a:b]

    full = call(x, weight, causal=True, attention_mask=mask)
    first, state = call(
        x[:, :cut], weight_of(0, cut), causal=True, attention_mask=mask[:, :cut], output_final_state=True
    )
    second = call(
        x[:, cut:], weight_of(cut, 9), causal=True, attention_mask=mask[:, cut:], initial_state=state
    )
    joined = torch.cat((first, second), 1)
    assert_close(joined, full, 1e-12)
    grad = torch.randn(full.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(
        torch.autograd.grad(joined, (x, weight), grad),
        torch.autograd.grad(full, (x, weight), grad),
        strict=True,
    ):
        assert_close(got, want, 1e-12)
    with pytest.raises(ValueError, match="causal=True"):
        call(x, weight, output_final_state=True)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        call(
            x,
            weight,
            causal=True,
            initial_state=ConvWindowState(torch.zeros(2, kernel_size + 1, 4, dtype=torch.float64)),
        )

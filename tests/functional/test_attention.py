"""softmax_attention and pointwise_attention against the float64 equations of docs/spec.md §1–2."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests import reference
from tests.reference import assert_close, assert_matches, query_mask
from tokenmix import functional as F
from tokenmix.functional import attention as attention_module

ACTIVATIONS = sorted(F.ACTIVATIONS)


def random_qkv(batch, heads, seq_len, dk, dv, dtype=torch.float64, generator=None, requires_grad=False):
    def make(d):
        return torch.randn(batch, heads, seq_len, d, dtype=torch.float64, generator=generator).to(dtype)

    q, k, v = make(dk), make(dk), make(dv)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def random_mask(batch, seq_len, generator):
    mask = torch.rand(batch, seq_len, generator=generator) > 0.35
    mask[:, 0] |= torch.rand(batch, generator=generator) > 0.5  # sometimes left padding, sometimes not
    return mask


cases = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 2),
        "heads": st.integers(1, 3),
        "seq_len": st.integers(1, 19),
        "dk": st.integers(1, 7),
        "dv": st.integers(1, 6),
        "causal": st.booleans(),
        "masked": st.booleans(),
        "tiling": st.sampled_from(["small", "grouped", "default"]),
        "seed": st.integers(0, 2**31 - 1),
    }
)


TILINGS = {
    "small": dict(_BLOCK_ROWS=4, _CAUSAL_BLOCK_ROWS=3, _TILE_ELEMENTS=1),  # many tiles, one head each
    "grouped": dict(_BLOCK_ROWS=5, _CAUSAL_BLOCK_ROWS=5, _TILE_ELEMENTS=200),  # several heads per tile
    "default": {},
}


def tiling(name: str) -> contextlib.AbstractContextManager:
    """Patch the op's tile sizes so small inputs cross tile boundaries."""
    return (
        mock.patch.multiple(attention_module, **TILINGS[name]) if TILINGS[name] else contextlib.nullcontext()
    )


def _inputs(case, requires_grad=True):
    gen = torch.Generator().manual_seed(case["seed"])
    q, k, v = random_qkv(
        case["batch"],
        case["heads"],
        case["seq_len"],
        case["dk"],
        case["dv"],
        generator=gen,
        requires_grad=requires_grad,
    )
    mask = random_mask(case["batch"], case["seq_len"], gen) if case["masked"] else None
    return q, k, v, mask, gen


def _check_against_reference(op, ref, case, **options):
    q, k, v, mask, gen = _inputs(case)
    with tiling(case["tiling"]):  # the backward reads the tile sizes too
        out = op(q, k, v, causal=case["causal"], attention_mask=mask, **options)
        expected = ref(q, k, v, causal=case["causal"], attention_mask=mask, **options)
        inputs = {"q": q, "k": k, "v": v}
        assert_matches(out, expected, inputs, 1e-6, rows=query_mask(mask, out.shape), generator=gen)


@given(
    case=cases,
    activation=st.sampled_from(ACTIVATIONS),
    alpha=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    length=st.one_of(st.none(), st.integers(1, 40)),
    scale=st.one_of(st.none(), st.floats(0.05, 3.0)),
)
def test_pointwise_matches_reference(case, activation, alpha, length, scale):
    _check_against_reference(
        F.pointwise_attention,
        reference.pointwise_attention,
        case,
        activation=activation,
        alpha=alpha,
        length=length,
        scale=scale,
    )


@given(case=cases, scale=st.one_of(st.none(), st.floats(0.05, 3.0)))
def test_softmax_matches_reference(case, scale):
    _check_against_reference(F.softmax_attention, reference.softmax_attention, case, scale=scale)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_pointwise_gradcheck(activation, causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = random_qkv(2, 2, 5, 3, 4, generator=gen, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])
    with tiling("grouped"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: F.pointwise_attention(
                q, k, v, activation=activation, causal=causal, attention_mask=mask, alpha=0.7
            ),
            (q, k, v),
        )


@pytest.mark.parametrize("causal", [False, True])
def test_pointwise_gradcheck_across_blocks(causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = random_qkv(1, 2, 13, 3, 2, generator=gen, requires_grad=True)  # 4-row tiles: several
    with tiling("small"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: F.pointwise_attention(q, k, v, activation="gelu", causal=causal), (q, k, v)
        )


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_gradcheck(causal):
    gen = torch.Generator().manual_seed(2)
    q, k, v = random_qkv(2, 2, 6, 3, 4, generator=gen, requires_grad=True)
    mask = torch.tensor([[True, True, True, False, True, False], [False, False, True, True, True, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: F.softmax_attention(q, k, v, causal=causal, attention_mask=mask), (q, k, v)
    )


@pytest.mark.parametrize("op", [F.softmax_attention, F.pointwise_attention])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_dtypes(op, dtype, tol):
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(2, 3, 33, 16, 8, generator=gen)
    mask = random_mask(2, 33, gen)
    ref_op = reference.softmax_attention if op is F.softmax_attention else reference.pointwise_attention
    for causal in (False, True):
        out = op(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, attention_mask=mask)
        assert out.dtype == dtype
        # The reference sees the same rounded inputs, so only the op's own arithmetic is measured.
        expected = ref_op(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, attention_mask=mask)
        assert_close(out, expected, tol, mask=query_mask(mask, out.shape), what=f"{dtype} causal={causal}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pointwise_half_precision_does_not_overflow(dtype):
    """relu² of scores near 300 is ~1e5, past float16's range; summing in float32 keeps the normalised
    result (which is in range) finite and accurate."""
    gen = torch.Generator().manual_seed(4)
    q = torch.full((1, 2, 64, 4), 17.0) + torch.rand(1, 2, 64, 4, generator=gen)
    k = torch.full((1, 2, 64, 4), 17.0) + torch.rand(1, 2, 64, 4, generator=gen)
    v = torch.rand(1, 2, 64, 4, generator=gen) * 1e-2
    out = F.pointwise_attention(q.to(dtype), k.to(dtype), v.to(dtype), activation="relu2", scale=1.0)
    expected = reference.pointwise_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), activation="relu2", scale=1.0
    )
    assert expected.abs().max() < 6e4 and (q * k).sum(-1).square().max() > 6.6e4
    assert_close(out, expected, 1e-2, what=str(dtype))


@pytest.mark.parametrize("op", [F.softmax_attention, F.pointwise_attention])
def test_padded_queries_stay_finite(op):
    """Left padding with causal attention leaves padded rows with no real key: outputs stay finite."""
    q, k, v = random_qkv(2, 2, 8, 4, 4, dtype=torch.float32)
    mask = torch.tensor([[False, False, False, True, True, True, True, True], [False] * 8])
    for causal in (False, True):
        out = op(q, k, v, causal=causal, attention_mask=mask)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("op", [F.softmax_attention, F.pointwise_attention])
def test_inputs_are_not_modified(op):
    q, k, v = random_qkv(1, 2, 20, 4, 4, requires_grad=True)
    before = [t.detach().clone() for t in (q, k, v)]
    op(q, k, v, causal=True).sum().backward()
    for original, tensor in zip(before, (q, k, v), strict=True):
        assert torch.equal(original, tensor.detach())


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("length", [None, 7])
def test_pointwise_step_is_last_causal_row(activation, length):
    q, k, v = random_qkv(2, 3, 9, 4, 5)
    full = F.pointwise_attention(q, k, v, activation=activation, causal=True, length=length)
    for t in range(9):
        row = F.pointwise_attention_cached(
            q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], activation=activation, length=length
        )
        assert_close(row[:, :, 0], full[:, :, t], 1e-12, what=f"t={t}")


def test_softmax_step_is_last_causal_row():
    q, k, v = random_qkv(2, 3, 9, 4, 5)
    full = F.softmax_attention(q, k, v, causal=True)
    for t in range(9):
        row = F.softmax_attention_cached(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1])
        assert_close(row[:, :, 0], full[:, :, t], 1e-12, what=f"t={t}")


def test_fixed_length_is_the_papers_divide_by_n():
    """length=N on an unmasked bidirectional input equals length=None (L_i = N for every row)."""
    q, k, v = random_qkv(1, 2, 11, 4, 4)
    assert_close(F.pointwise_attention(q, k, v, length=11), F.pointwise_attention(q, k, v), 1e-14)


BAD_CALLS = [
    (dict(q=torch.randn(2, 5, 4)), ValueError, "q must have shape"),
    (dict(k=torch.randn(1, 2, 6, 4)), ValueError, "N=6"),
    (dict(k=torch.randn(1, 2, 5, 3)), ValueError, "K=3"),
    (dict(v=torch.randn(1, 3, 5, 4)), ValueError, "H=3"),
    (dict(v=torch.randn(1, 2, 5, 4, dtype=torch.float64)), TypeError, "dtype"),
    (dict(q=torch.ones(1, 2, 5, 4, dtype=torch.long)), TypeError, "floating dtype"),
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(attention_mask=torch.ones(1, 4, dtype=torch.bool)), ValueError, "attention_mask must have shape"),
    (dict(attention_mask=torch.full((1, 5), 2)), ValueError, "0/1"),
    (dict(scale="big"), TypeError, "scale"),
]


@pytest.mark.parametrize("op", [F.softmax_attention, F.pointwise_attention])
@pytest.mark.parametrize("bad,error,message", BAD_CALLS)
def test_bad_input_raises_clear_errors(op, bad, error, message):
    args = dict(q=torch.randn(1, 2, 5, 4), k=torch.randn(1, 2, 5, 4), v=torch.randn(1, 2, 5, 4))
    args.update(bad)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=message):
        op(q, k, v, **args)


@pytest.mark.parametrize(
    "options,error,message",
    [
        (dict(activation="tanh"), ValueError, "activation must be one of"),
        (dict(length=0), ValueError, "length must be positive"),
        (dict(length=2.5), TypeError, "length must be a positive int"),
        (dict(alpha=float("nan")), ValueError, "alpha must be finite"),
    ],
)
def test_pointwise_bad_options(options, error, message):
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(error, match=message):
        F.pointwise_attention(q, q, q, **options)


@pytest.mark.parametrize("which", ["softmax", "pointwise"])
def test_the_cached_forms_without_causal_see_every_real_key(which):
    """causal=False (a context-parallel rank's queries over the whole sequence's keys): the T queries'
    rows equal the bidirectional op's rows over all L positions, a padded key left out, against the
    float64 equations; gradients too."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (
        torch.randn(2, 2, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 1], mask[1, 7] = False, False
    if which == "softmax":
        cached, oracle, options = F.softmax_attention_cached, reference.softmax_attention, {}
    else:
        cached = F.pointwise_attention_cached
        oracle, options = reference.pointwise_attention, {"activation": "relu2", "alpha": 0.5}
    rows = slice(3, 7)  # queries in the middle: not the newest, so only causal=False gives these rows
    got = cached(q[:, :, rows], k, v, key_mask=mask, causal=False, **options)
    want = oracle(q, k, v, causal=False, attention_mask=mask, **options)[:, :, rows]
    keep = mask[:, None, rows, None].expand_as(got)
    assert_matches(got, want, {"q": q, "k": k, "v": v}, 1e-9, rows=keep, generator=gen, what=which)

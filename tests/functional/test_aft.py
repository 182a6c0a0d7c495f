"""aft_full and aft_simple against the float64 equation of docs/spec.md §4, including extreme keys and
biases."""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests import reference
from tests.functional.recurrent import check_pieces
from tests.reference import assert_close, assert_float32_matches, assert_grads_close, assert_matches
from tokenmix.functional import aft, aft_conv, aft_full, aft_local, aft_local_lowrank, aft_simple

OPS = ["aft_full", "aft_local", "aft_simple"]


def call(module, op_name, q, k, v, w, window, **options):
    """Call ``op_name`` from ``module`` (tokenmix's or the reference) with the arguments it takes."""
    if op_name == "aft_simple":
        return getattr(module, op_name)(q, k, v, **options)
    if op_name == "aft_local":
        return getattr(module, op_name)(q, k, v, w, window=window, **options)
    return getattr(module, op_name)(q, k, v, w, **options)


def inputs_of(op_name, q, k, v, w):
    return (q, k, v) if op_name == "aft_simple" else (q, k, v, w)


def band_path(dense: bool):
    """AFT-local's and AFT-conv's band as one dense matrix (what short sequences take) or added offset by
    offset (long ones): both paths, whatever the test's length."""
    sizes = {"DENSE_BAND_SIZE": float("inf"), "DENSE_BAND_REACH": 10**9} if dense else {"DENSE_BAND_REACH": 0}
    return mock.patch.multiple(aft.local, **sizes)


def random_case(batch, seq_len, channels, max_len, seed, dtype=torch.float64, key_scale=1.0, bias_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seq_len, channels, generator=gen, dtype=torch.float64) for _ in range(3))
    w = torch.randn(max_len, max_len, generator=gen, dtype=torch.float64) * bias_scale
    mask = torch.rand(batch, seq_len, generator=gen) > 0.3
    tensors = [t.to(dtype).requires_grad_() for t in (q, k * key_scale, v, w)]
    return tensors, mask, gen


def check(op_name, tensors, mask, gen, causal, tol=1e-6, grads=True, window=3):
    q, k, v, w = tensors
    options = dict(causal=causal, attention_mask=mask)
    out = call(aft, op_name, q, k, v, w, window, **options)
    expected = call(reference, op_name, q, k, v, w, window, **options)
    rows = None if mask is None else mask[..., None].expand_as(out)
    inputs = dict(zip("qkvw", inputs_of(op_name, q, k, v, w), strict=False))
    assert_matches(out, expected, inputs, tol, rows=rows, generator=gen, grads=grads, what=op_name)


cases = dict(
    op_name=st.sampled_from(OPS),
    window=st.integers(1, 22),
    batch=st.integers(1, 2),
    seq_len=st.integers(1, 20),
    channels=st.integers(1, 5),
    extra_len=st.integers(0, 4),
    causal=st.booleans(),
    masked=st.booleans(),
    small_blocks=st.booleans(),
    dense_band=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


# Blocks of a few elements: every blocked loop of the reference paths takes several turns.
SMALL_BLOCKS = (
    (aft.exact, {"BLOCK_ELEMENTS": 7}),
    (aft.simple, {"SCAN_CHUNK": 3}),
)


@given(**cases)
def test_matches_reference(
    op_name, window, batch, seq_len, channels, extra_len, causal, masked, small_blocks, dense_band, seed
):
    tensors, mask, gen = random_case(batch, seq_len, channels, seq_len + extra_len, seed)
    small = (mock.patch.multiple(module, **sizes) for module, sizes in SMALL_BLOCKS) if small_blocks else ()
    with contextlib.ExitStack() as stack:
        stack.enter_context(band_path(dense_band))
        for patch in small:
            stack.enter_context(patch)
        check(op_name, tensors, mask if masked else None, gen, causal, window=window)


@given(**cases)
def test_exact_fallback_matches_reference(
    op_name, window, batch, seq_len, channels, extra_len, causal, masked, small_blocks, dense_band, seed
):
    """Every entry recomputed with its joint maximum (the path underflowed entries take)."""
    tensors, mask, gen = random_case(batch, seq_len, channels, seq_len + extra_len, seed)
    with mock.patch.dict(aft.common.TINY, {torch.float64: float("inf")}), band_path(dense_band):
        check(op_name, tensors, mask if masked else None, gen, causal, window=window)


@pytest.mark.parametrize(
    "op_name,dense", [("aft_full", True), ("aft_local", True), ("aft_local", False), ("aft_simple", True)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_extreme_keys_and_biases_stay_accurate_in_float32(op_name, dense, causal):
    """|k| and |w| in the hundreds, where separate maxima underflow to 0/0 without the exact fallback:
    the output within 1e-4 of float64, every gradient finite and within 1e-3 (the backward divides by
    no underflowed denominator)."""
    with band_path(dense):
        for seed in range(3):
            tensors, mask, gen = random_case(2, 24, 6, 24, seed, key_scale=300.0, bias_scale=300.0)
            for m in (None, mask):
                check_extreme(op_name, [t.detach() for t in tensors], m, gen, causal, f"seed {seed}")


def check_extreme(op_name, tensors, mask, gen, causal, what):
    q, k, v, w = tensors
    rows = None if mask is None else mask[..., None].expand_as(q)

    def op(*args, module=aft):
        q, k, v, *w_or_none = args
        w = w_or_none[0] if w_or_none else None
        return call(module, op_name, q, k, v, w, 5, causal=causal, attention_mask=mask)

    inputs = dict(zip("qkvw", inputs_of(op_name, q, k, v, w), strict=False))
    reference_op = functools.partial(op, module=reference)
    assert_float32_matches(op, reference_op, inputs, 1e-3, rows=rows, generator=gen, what=f"{op_name} {what}")
    out = op(*(t.float() for t in inputs.values()))
    assert_close(out, reference_op(*inputs.values()), 1e-4, mask=rows, what=what)


def test_backward_of_an_underflowed_denominator_is_finite():
    """The issue's case: key −100 is e^-100 below the maximum, so row 0's denominator underflows in the
    fast path; its gradient must be the float64 one (0), not NaN."""
    k = torch.tensor([-100.0, 0.0]).view(1, 2, 1).requires_grad_()
    aft_simple(torch.zeros(1, 2, 1), k, torch.ones(1, 2, 1), causal=True).sum().backward()
    k64 = k.detach().double().requires_grad_()
    reference.aft_simple(torch.zeros(1, 2, 1), k64, torch.ones(1, 2, 1), causal=True).sum().backward()
    assert torch.isfinite(k.grad).all() and torch.allclose(k.grad.double(), k64.grad, atol=1e-6)


def test_causal_prefix_far_below_the_sequence_maximum():
    """Keys rising from −500 to +500: every early row's keys are ~e^-1000 below the global maximum."""
    seq_len = 40
    k = torch.linspace(-500, 500, seq_len)[None, :, None].expand(2, seq_len, 3).contiguous()
    q, v = torch.randn(2, seq_len, 3), torch.randn(2, seq_len, 3)
    w = torch.randn(seq_len, seq_len) * 200
    for op_name in OPS:
        out = call(aft, op_name, q, k, v, w, 7, causal=True)
        expected = call(reference, op_name, q.double(), k.double(), v.double(), w.double(), 7, causal=True)
        assert_close(out, expected, 1e-4, what=op_name)


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(op_name, causal):
    tensors, mask, _ = random_case(2, 6, 3, 8, seed=1)
    args = inputs_of(op_name, *tensors)

    def op(*a):
        return call(
            aft,
            op_name,
            *a,
            *([tensors[3]] if op_name == "aft_simple" else []),
            2,
            causal=causal,
            attention_mask=mask,
        )

    for dense in (True, False) if op_name == "aft_local" else (True,):
        with band_path(dense):
            assert torch.autograd.gradcheck(op, args)
            with mock.patch.dict(aft.common.TINY, {torch.float64: float("inf")}):  # the exact path too
                assert torch.autograd.gradcheck(op, args)


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_low_precision(op_name, dtype, tol):
    tensors, mask, gen = random_case(2, 19, 8, 19, seed=2, dtype=dtype)
    tensors = [t.detach() for t in tensors]
    for causal in (False, True):
        check(op_name, tensors, mask, gen, causal, tol, grads=False)
        assert call(aft, op_name, *tensors, 4, causal=causal).dtype == dtype


def test_errors_name_the_argument():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="N_max ≥ N = 5"):
        aft_full(x, x, x, torch.randn(4, 4))
    with pytest.raises(ValueError, match="square"):
        aft_full(x, x, x, torch.randn(5, 6))
    with pytest.raises(ValueError, match="w must have shape"):
        aft_full(x, x, x, torch.randn(5))
    with pytest.raises(TypeError, match="dtype"):
        aft_full(x, x, x, torch.randn(5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="v has D=3"):
        aft_simple(x, x, x[..., :3])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        aft_simple(x, x, x, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="window must be positive"):
        aft_local(x, x, x, torch.randn(5, 5), window=0)
    with pytest.raises(ValueError, match="N_max ≥ N = 5"):
        aft_local(x, x, x, torch.randn(3, 3), window=2)


def conv_case(batch, seq_len, heads, head_dim, kernel_size, seed, dtype=torch.float64, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q, v = (
        torch.randn(batch, seq_len, heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(2)
    )
    k = torch.randn(batch, seq_len, heads, generator=gen, dtype=torch.float64) * scale
    w = torch.randn(heads, kernel_size, generator=gen, dtype=torch.float64) * scale
    mask = torch.rand(batch, seq_len, generator=gen) > 0.3
    return [t.to(dtype).requires_grad_() for t in (q, k, v, w)], mask, gen


def check_conv(tensors, mask, gen, causal=False, tol=1e-6, grads=True):
    """aft_conv against its reference, 1-D or (for 5-D q) 2-D."""
    out = aft_conv(*tensors, causal=causal, attention_mask=mask)
    if tensors[0].dim() == 5:
        expected = reference.aft_conv_2d(*tensors, attention_mask=mask)
    else:
        expected = reference.aft_conv(*tensors, causal=causal, attention_mask=mask)
    rows = None if mask is None else mask[..., None, None].expand_as(out)
    inputs = dict(zip("qkvw", tensors, strict=True))
    assert_matches(out, expected, inputs, tol, rows=rows, generator=gen, grads=grads, what="aft_conv")


@given(
    batch=st.integers(1, 2),
    seq_len=st.integers(1, 14),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 3),
    half_kernel=st.integers(0, 8),
    causal=st.booleans(),
    even=st.booleans(),
    masked=st.booleans(),
    exact=st.booleans(),
    dense_band=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_conv_matches_reference(
    batch, seq_len, heads, head_dim, half_kernel, causal, even, masked, exact, dense_band, seed
):
    kernel_size = 2 * half_kernel + 1 + (1 if even and causal else 0)  # even sizes only where allowed
    tensors, mask, gen = conv_case(batch, seq_len, heads, head_dim, kernel_size, seed)
    exact_path = mock.patch.dict(aft.common.TINY, {torch.float64: float("inf")} if exact else {})
    with exact_path, band_path(dense_band):
        check_conv(tensors, mask if masked else None, gen, causal)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_conv_extreme_keys_and_kernels_in_float32(causal, dense):
    with band_path(dense):
        for seed in range(3):
            tensors, mask, _ = conv_case(2, 24, 3, 4, 7, seed, scale=300.0)
            for m in (None, mask):
                check_conv_extreme([t.detach() for t in tensors], m, causal, f"seed {seed}")


def check_conv_extreme(tensors, mask, causal, what):
    out = aft_conv(*[t.float() for t in tensors], causal=causal, attention_mask=mask)
    expected = reference.aft_conv(*tensors, causal=causal, attention_mask=mask)
    rows = None if mask is None else mask[..., None, None].expand_as(out)
    assert_close(out, expected, 1e-4, mask=rows, what=what)
    assert_float32_matches(
        lambda *a: aft_conv(*a, causal=causal, attention_mask=mask),
        lambda *a: reference.aft_conv(*a, causal=causal, attention_mask=mask),
        dict(zip("qkvw", tensors, strict=True)),
        1e-3,
        rows=rows,
        what=f"aft_conv {what}",
    )


@pytest.mark.parametrize("causal", [False, True])
def test_conv_gradcheck(causal):
    tensors, mask, _ = conv_case(2, 6, 2, 2, 3, seed=3)
    op = lambda *a: aft_conv(*a, causal=causal, attention_mask=mask)  # noqa: E731
    for dense in (True, False):
        with band_path(dense):
            assert torch.autograd.gradcheck(op, tuple(tensors))
            with mock.patch.dict(aft.common.TINY, {torch.float64: float("inf")}):
                assert torch.autograd.gradcheck(op, tuple(tensors))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_conv_low_precision(dtype, tol):
    tensors, mask, gen = conv_case(2, 17, 2, 4, 5, seed=4, dtype=dtype)
    for causal in (False, True):
        check_conv([t.detach() for t in tensors], mask, gen, causal, tol, grads=False)


def test_conv_errors_name_the_argument():
    q, k, w = torch.randn(2, 5, 2, 3), torch.randn(2, 5, 2), torch.randn(2, 3)
    with pytest.raises(ValueError, match="odd size K"):
        aft_conv(q, k, q, torch.randn(2, 4))
    with pytest.raises(ValueError, match="k has H=3"):
        aft_conv(q, torch.randn(2, 5, 3), q, w)
    with pytest.raises(ValueError, match="k must have shape"):
        aft_conv(q, q, q, w)
    with pytest.raises(ValueError, match="w has H=3"):
        aft_conv(q, k, q, torch.randn(3, 3))
    assert aft_conv(q, k, q, torch.randn(2, 4), causal=True).shape == q.shape  # even K is fine causally


@given(
    seq_len=st.integers(1, 16),
    window=st.integers(1, 18),
    rank=st.integers(1, 4),
    causal=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_lowrank_local_equals_the_full_table(seq_len, window, rank, causal, masked, seed):
    tensors, mask, gen = random_case(2, seq_len, 3, seq_len + 2, seed)
    q, k, v, _ = tensors
    w_u, w_v = (
        torch.randn(seq_len + 2, rank, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )
    options = dict(window=window, causal=causal, attention_mask=mask if masked else None)
    out = aft_local_lowrank(q, k, v, w_u, w_v, **options)
    expected = aft_local(q, k, v, w_u @ w_v.T, **options)
    rows = None if not masked else mask[..., None].expand_as(out)
    assert_close(out, expected, 1e-10, mask=rows)
    grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype) * (1 if rows is None else rows)
    got = torch.autograd.grad(out, (q, k, v, w_u, w_v), grad_out)
    want = torch.autograd.grad(expected, (q, k, v, w_u, w_v), grad_out)
    assert_grads_close(got, want, 1e-10, ["q", "k", "v", "w_u", "w_v"])


def conv_2d_case(
    batch, size_x, size_y, heads, head_dim, kernel_x, kernel_y, seed, dtype=torch.float64, scale=1.0
):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, size_x, size_y, heads, head_dim)
    q, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    k = torch.randn(shape[:-1], generator=gen, dtype=torch.float64) * scale
    w = torch.randn(heads, kernel_x, kernel_y, generator=gen, dtype=torch.float64) * scale
    mask = torch.rand(batch, size_x, size_y, generator=gen) > 0.3
    return [t.to(dtype).requires_grad_() for t in (q, k, v, w)], mask, gen


@given(
    size_x=st.integers(1, 5),
    size_y=st.integers(1, 5),
    heads=st.integers(1, 2),
    head_dim=st.integers(1, 2),
    half_x=st.integers(0, 3),
    half_y=st.integers(0, 3),
    masked=st.booleans(),
    exact=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_conv_2d_matches_reference(size_x, size_y, heads, head_dim, half_x, half_y, masked, exact, seed):
    tensors, mask, gen = conv_2d_case(
        2, size_x, size_y, heads, head_dim, 2 * half_x + 1, 2 * half_y + 1, seed
    )
    with mock.patch.dict(aft.common.TINY, {torch.float64: float("inf")} if exact else {}):
        check_conv(tensors, mask if masked else None, gen)


def test_conv_2d_extreme_values_in_float32():
    for seed in range(3):
        tensors, mask, _ = conv_2d_case(2, 6, 5, 2, 3, 3, 5, seed, scale=300.0)
        tensors = [t.detach() for t in tensors]
        for m in (None, mask):
            out = aft_conv(*[t.float() for t in tensors], attention_mask=m)
            expected = reference.aft_conv_2d(*tensors, attention_mask=m)
            rows = None if m is None else m[..., None, None].expand_as(out)
            assert_close(out, expected, 1e-4, mask=rows, what=f"seed {seed}")
            assert_float32_matches(
                lambda *a, m=m: aft_conv(*a, attention_mask=m),
                lambda *a, m=m: reference.aft_conv_2d(*a, attention_mask=m),
                dict(zip("qkvw", tensors, strict=True)),
                1e-3,
                rows=rows,
                what=f"aft_conv 2-D seed {seed}",
            )


def test_conv_2d_gradcheck_and_low_precision():
    tensors, mask, gen = conv_2d_case(1, 3, 4, 2, 2, 3, 3, seed=5)
    op = lambda *a: aft_conv(*a, attention_mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(op, tuple(tensors))
    with mock.patch.dict(aft.common.TINY, {torch.float64: float("inf")}):
        assert torch.autograd.gradcheck(op, tuple(tensors))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        half = [t.detach().to(dtype) for t in tensors]
        check_conv(half, mask, gen, tol=tol, grads=False)


def test_conv_2d_errors_name_the_argument():
    q, k, w = torch.randn(2, 3, 4, 2, 5), torch.randn(2, 3, 4, 2), torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match="bidirectional only"):
        aft_conv(q, k, q, w, causal=True)
    with pytest.raises(ValueError, match="odd sizes"):
        aft_conv(q, k, q, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, X, Y\)"):
        aft_conv(q, k, q, w, attention_mask=torch.ones(2, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="w must have shape"):
        aft_conv(q, k, q, torch.randn(2, 3))


@given(
    seq_len=st.integers(1, 12),
    cut=st.integers(0, 12),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_aft_simple_initial_and_final_state_split_the_causal_op(seq_len, cut, masked, seed):
    """The recurrent convention (docs/spec.md §7): the op over [0, cut) with output_final_state, then over
    [cut, N) from that state, equals the causal op over [0, N) — outputs and gradients; padding folds
    nothing into the state."""
    cut = min(cut, seq_len)
    tensors, mask, gen = random_case(2, seq_len, 3, seq_len, seed)
    q, k, v, _ = tensors
    mask = mask if masked else None
    full = aft_simple(q, k, v, causal=True, attention_mask=mask)

    def part(t, a, b):
        return None if t is None else t[:, a:b]

    first, state = aft_simple(
        q[:, :cut],
        k[:, :cut],
        v[:, :cut],
        causal=True,
        attention_mask=part(mask, 0, cut),
        output_final_state=True,
    )
    second = aft_simple(
        q[:, cut:],
        k[:, cut:],
        v[:, cut:],
        causal=True,
        attention_mask=part(mask, cut, seq_len),
        initial_state=state,
    )
    rows = None if mask is None else mask[..., None].expand_as(full)
    joined = torch.cat((first, second), 1)
    assert_matches(
        joined, full.detach(), {"q": q, "k": k, "v": v}, 1e-10, rows=rows, generator=gen, grads=False
    )
    grad = torch.randn(full.shape, generator=gen, dtype=full.dtype) * (1 if rows is None else rows)
    got = torch.autograd.grad(joined, (q, k, v), grad)
    want = torch.autograd.grad(full, (q, k, v), grad)
    assert_grads_close(got, want, 1e-9, list("qkv"), "split")


@pytest.mark.parametrize("groups", [6, 2, 1], ids=["key per channel", "key per head", "one key"])
@pytest.mark.parametrize("dtype,key_scale,tol", [(torch.float64, 1.0, 1e-12), (torch.float32, 80.0, 1e-5)])
def test_accumulate_folds_keys_shared_by_channels(groups, dtype, key_scale, tol):
    """aft_accumulate's fold, in two calls through its running state, against the float64 sums of the
    keys it selects, each key (B, J, K) serving D / K channels: per channel, numerator / denominator is
    the softmax over the keys of v, and max + log(denominator) their log-sum-exp; a row with no key
    holds (−inf, 0, 0). In float32 the keys span ±80 (their exponentials overflow unshifted)."""
    gen = torch.Generator().manual_seed(groups)
    batch, keys, channels, cut = 3, 9, 6, 4
    k = torch.randn(batch, keys, groups, generator=gen, dtype=torch.float64) * key_scale
    v = torch.randn(batch, keys, channels, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, keys, generator=gen) > 0.4
    mask[2] = False  # a row with no key
    mask[1, :cut] = False  # a row whose first fold is empty
    state = aft.aft_accumulate(None, k[:, :cut].to(dtype), v[:, :cut].to(dtype), mask[:, :cut])
    state = aft.aft_accumulate(state, k[:, cut:].to(dtype), v[:, cut:].to(dtype), mask[:, cut:])
    wide = k.repeat_interleave(channels // groups, -1).masked_fill(~mask[..., None], float("-inf"))
    weights = torch.softmax(wide[:2], 1)
    got = (state.numerator[:2] / state.denominator[:2]).double()
    assert_close(got, (weights * v[:2]).sum(1), tol, what="numerator / denominator")
    got = (state.max[:2] + state.denominator[:2].log()).double()
    assert_close(got, wide[:2].logsumexp(1), tol, what="max + log(denominator)")
    assert state.max[2].eq(float("-inf")).all(), "a row with no key: max"
    assert not state.numerator[2].any() and not state.denominator[2].any(), "a row with no key: sums"


def test_aft_simple_state_needs_causal():
    q = torch.randn(1, 3, 2)
    with pytest.raises(ValueError, match="causal=True"):
        aft_simple(q, q, q, output_final_state=True)


@pytest.mark.parametrize("form", ["aft_local", "aft_local_lowrank", "aft_conv"])
@pytest.mark.parametrize("cuts", [[0, 9], [0, 1, 2, 6, 7, 9], [0, 4, 5, 9]])
def test_windowed_ops_continue_from_their_state(form, cuts):
    """aft_local, aft_local_lowrank, aft_conv in pieces from AFTWindowState: each left-padded row equals
    its own causal op (biases by the row's own positions), outputs and every gradient, float64."""
    gen = torch.Generator().manual_seed(len(cuts))
    window = 3

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if form == "aft_conv":
        sequences = [randn(3, 9, 2, 2), randn(3, 9, 2), randn(3, 9, 2, 2)]
        parameters = [randn(2, window).requires_grad_()]

        def op(q, k, v, w, **state):
            return aft_conv(q, k, v, w, causal=True, **state)

    else:
        sequences = [randn(3, 9, 4) for _ in range(3)]
        if form == "aft_local":
            parameters = [randn(12, 12).requires_grad_()]

            def op(q, k, v, w, **state):
                return aft_local(q, k, v, w, window=window, causal=True, **state)

        else:
            parameters = [randn(12, 2).requires_grad_(), randn(12, 2).requires_grad_()]

            def op(q, k, v, w_u, w_v, **state):
                return aft_local_lowrank(q, k, v, w_u, w_v, window=window, causal=True, **state)

    check_pieces(op, sequences, parameters, cuts, [9, 5, 7], 1e-10)


def test_windowed_state_errors_name_the_argument():
    q, w = torch.randn(2, 4, 3), torch.randn(8, 8)
    _, state = aft_local(q, q, q, w, window=2, causal=True, output_final_state=True)
    with pytest.raises(ValueError, match="causal=True"):
        aft_local(q, q, q, w, window=2, output_final_state=True)
    with pytest.raises(TypeError, match="initial_state must be the AFTWindowState"):
        aft_local(q, q, q, w, window=2, causal=True, initial_state=(1, 2))
    with pytest.raises(ValueError, match="initial_state holds keys of shape"):
        aft_local(q, q, q, w, window=3, causal=True, initial_state=state)
    with pytest.raises(ValueError, match="N_max"):  # positions 4 … 11 run past the 8-row table
        aft_local(
            torch.randn(2, 8, 3),
            torch.randn(2, 8, 3),
            torch.randn(2, 8, 3),
            w,
            window=2,
            causal=True,
            initial_state=state,
        )


def _saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``run()`` builds its graph."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


@pytest.mark.parametrize("op", ["aft_local", "aft_local_lowrank", "aft_conv"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_the_window_costs_no_more_saved_memory_than_its_bias_band(op, causal):
    """O(N·d) for the backward whatever the window: from window 8 to 64 what autograd keeps grows by the
    (N, J) band only, not by J copies of (N, d) (the low-rank band once gathered an (N, J, rank) copy)."""
    seq_len, dim = 512, 32
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    q, k, v = leaf(1, seq_len, dim), leaf(1, seq_len, dim), leaf(1, seq_len, dim)

    def call(window: int):
        if op == "aft_local":
            return lambda: aft_local(q, k, v, leaf(seq_len, seq_len), window=window, causal=causal)
        if op == "aft_local_lowrank":
            u, w = leaf(seq_len, dim), leaf(seq_len, dim)
            return lambda: aft_local_lowrank(q, k, v, u, w, window=window, causal=causal)
        heads = 4
        return lambda: aft_conv(
            q.view(1, seq_len, heads, -1), k[..., :heads], v.view(1, seq_len, heads, -1),
            leaf(heads, 2 * window - 1), causal=causal,
        )  # fmt: skip

    # The band grows by (N, J·heads) entries: 16 bytes each covers its index (int64), value and exponential.
    offsets = (64 - 8) * (1 if causal else 2)
    band_growth = 16 * seq_len * offsets * (4 if op == "aft_conv" else 1)
    growth = _saved_bytes(call(64)) - _saved_bytes(call(8))
    assert growth < band_growth + 4 * seq_len * dim * 4, growth


@pytest.mark.parametrize("every_entry_exact", [False, True])
def test_aft_simple_continues_its_scan_from_the_state(every_entry_exact):
    """aft_simple from an initial_state runs its O(T·D) scan started from the state (chunks of 3 here,
    crossing the cuts) — in pieces equal to the float64 equation on each row's own sequence, outputs
    and every gradient, with keys spanning ±40 so that denominators underflow and are recomputed with
    the state's keys in front (or every entry is, with ``every_entry_exact``)."""
    gen = torch.Generator().manual_seed(7)
    sequences = [torch.randn(3, 13, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    sequences[1] = sequences[1] * 40

    def op(q, k, v, **state):
        if not state:  # each row's own sequence: the equation
            return reference.aft_simple(q, k, v, causal=True)
        return aft_simple(q, k, v, causal=True, **state)

    tiny = {torch.float64: float("inf")} if every_entry_exact else {}
    with mock.patch.object(aft.simple, "SCAN_CHUNK", 3), mock.patch.dict(aft.common.TINY, tiny):
        check_pieces(op, sequences, [], [0, 5, 6, 13], [13, 8, 11], 1e-10)


def test_aft_simple_state_carries_a_nan_to_every_later_row():
    """A NaN key folded into the state reaches every row after it in its channel, as in the whole op;
    the other channels stay finite."""
    q, k, v = (torch.randn(2, 9, 3, dtype=torch.float64) for _ in range(3))
    k[1, 2, 0] = float("nan")
    _, state = aft_simple(q[:, :4], k[:, :4], v[:, :4], causal=True, output_final_state=True)
    later = aft_simple(q[:, 4:], k[:, 4:], v[:, 4:], causal=True, initial_state=state)
    whole = aft_simple(q, k, v, causal=True)[:, 4:]
    assert torch.equal(torch.isnan(later), torch.isnan(whole)) and torch.isnan(later[1, :, 0]).all()
    torch.testing.assert_close(later.nan_to_num(0.0), whole.nan_to_num(0.0), rtol=1e-10, atol=1e-10)

from __future__ import annotations

import itertools

import pytest
import torch

import tokenmix
from tests import reference
from tests.reference import assert_close, assert_float32_matches, relative_error
from tokenmix.functional import aft_conv, aft_full, aft_local, aft_local_lowrank, aft_simple

from .conftest import TOLERANCE


def run(backend, op, inputs, grad, **options):
    with tokenmix.use_backend(backend):
        out = op(*inputs, **options)
        return (out, *torch.autograd.grad(out, inputs, grad))


def assert_kernel_matches(op, inputs, grad, dtype, names, **options):
    expected = run("reference", op, inputs, grad, **options)
    got = run("triton", op, inputs, grad, **options)
    for name, ours, want in zip(names, got, expected, strict=True):
        assert ours.dtype == dtype and ours.shape == want.shape
        error = relative_error(ours.double(), want.double())
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e}"


def assert_kernel_gradients_finite(op, expected_op, inputs, *, attention_mask, **options):
    """The kernels' float32 output and gradients at extreme keys and biases against the float64
    reference: finite and within 1e-3 (rows padded under ``attention_mask`` are unspecified)."""

    def kernel(*tensors):
        with tokenmix.use_backend("triton"):
            return op(*tensors, attention_mask=attention_mask, **options)

    out_shape = inputs["q"].shape
    rows = attention_mask.view(*attention_mask.shape, *[1] * (len(out_shape) - attention_mask.dim()))
    rows = rows.expand(out_shape)
    assert_float32_matches(
        kernel,
        lambda *tensors: expected_op(*tensors, attention_mask=attention_mask, **options),
        inputs,
        1e-3,
        rows=rows,
        what=op.__name__,
    )


def case(device, dtype, batch=2, seq_len=37, dim=24, seed=0, key_scale=1.0):
    """Odd shapes: N not a multiple of the time block, D not a power of two."""
    generator = torch.Generator(device).manual_seed(seed)
    q, k, v = (torch.randn(batch, seq_len, dim, generator=generator, device=device) for _ in range(3))
    tensors = [t.to(dtype).requires_grad_() for t in (q, k * key_scale, v)]
    grad = torch.randn(batch, seq_len, dim, generator=generator, device=device).to(dtype)
    mask = torch.rand(batch, seq_len, generator=generator, device=device) > 0.3
    mask[:, 0] = False  # causal row 0 sees no real key
    return tensors, grad, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_aft_simple_matches_the_reference(device, dtype, causal, masked):
    inputs, grad, mask = case(device, dtype)
    options = {"causal": causal, "attention_mask": mask if masked else None}
    assert_kernel_matches(aft_simple, inputs, grad, dtype, ("out", "dq", "dk", "dv"), **options)


@pytest.mark.parametrize("causal", [False, True])
def test_aft_simple_extreme_keys_against_float64(device, causal):
    """|k| in the hundreds, and causal prefixes e^-1000 below the sequence maximum: the running
    log-sum-exp keeps every row exact."""
    inputs, _, mask = case(device, torch.float64, key_scale=300.0)
    rising = torch.linspace(-500, 500, 37, device=device, dtype=torch.float64)[None, :, None]
    for keys in (inputs[1], rising.expand(2, 37, 24)):
        q, v = inputs[0].detach(), inputs[2].detach()
        for m in (None, mask):
            with tokenmix.use_backend("triton"):
                out = aft_simple(q.float(), keys.detach().float(), v.float(), causal=causal, attention_mask=m)
            expected = reference.aft_simple(q, keys.detach(), v, causal=causal, attention_mask=m)
            assert torch.isfinite(out).all()
            assert_close(out, expected, 1e-4)
        assert_kernel_gradients_finite(
            aft_simple, reference.aft_simple, dict(q=q, k=keys, v=v), causal=causal, attention_mask=mask
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_aft_full_matches_the_reference(device, dtype, causal, masked):
    (q, k, v), grad, mask = case(device, dtype, seq_len=21, dim=20)
    generator = torch.Generator(device).manual_seed(1)
    w = torch.randn(24, 24, generator=generator, device=device).to(dtype).requires_grad_()  # N_max > N
    inputs = (q, k, v, w)
    options = {"causal": causal, "attention_mask": mask if masked else None}
    assert_kernel_matches(aft_full, inputs, grad, dtype, ("out", "dq", "dk", "dv", "dw"), **options)


@pytest.mark.parametrize("causal", [False, True])
def test_aft_full_extreme_keys_and_biases_against_float64(device, causal):
    """|k| and |w| in the hundreds: separate maxima of k and w would underflow to 0/0; the joint one
    does not."""
    (q, k, v), _, mask = case(device, torch.float64, seq_len=21, dim=20, key_scale=300.0)
    generator = torch.Generator(device).manual_seed(2)
    w = torch.randn(21, 21, generator=generator, device=device, dtype=torch.float64) * 300
    q, k, v = q.detach(), k.detach(), v.detach()
    for m in (None, mask):
        with tokenmix.use_backend("triton"):
            out = aft_full(q.float(), k.float(), v.float(), w.float(), causal=causal, attention_mask=m)
        expected = reference.aft_full(q, k, v, w, causal=causal, attention_mask=m)
        assert torch.isfinite(out).all()
        assert_close(out, expected, 1e-4)
    assert_kernel_gradients_finite(
        aft_full, reference.aft_full, dict(q=q, k=k, v=v, w=w), causal=causal, attention_mask=mask
    )


def local_case(device, dtype, window, seq_len=23, dim=12, seed=3):
    (q, k, v), grad, mask = case(device, dtype, seq_len=seq_len, dim=dim, seed=seed)
    generator = torch.Generator(device).manual_seed(seed + 1)
    w = torch.randn(seq_len + 3, seq_len + 3, generator=generator, device=device).to(dtype).requires_grad_()
    return (q, k, v, w), grad, mask


def conv_case(device, dtype, heads=3, head_dim=5, kernel_size=5, seq_len=23, seed=4):
    generator = torch.Generator(device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(dtype).requires_grad_()

    inputs = (
        randn(2, seq_len, heads, head_dim),
        randn(2, seq_len, heads),
        randn(2, seq_len, heads, head_dim),
    )
    grad = torch.randn(2, seq_len, heads, head_dim, generator=generator, device=device).to(dtype)
    mask = torch.rand(2, seq_len, generator=generator, device=device) > 0.3
    return (*inputs, randn(heads, kernel_size)), grad, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("window", [1, 4, 40])  # 40 > N: the band covers the sequence, the scans nothing
def test_aft_local_matches_the_reference(device, dtype, causal, masked, window):
    inputs, grad, mask = local_case(device, dtype, window)
    options = {"window": window, "causal": causal, "attention_mask": mask if masked else None}
    assert_kernel_matches(aft_local, inputs, grad, dtype, ("out", "dq", "dk", "dv", "dw"), **options)


@pytest.mark.parametrize("causal", [False, True])
def test_aft_local_lowrank_matches_the_reference(device, causal):
    (q, k, v, _), grad, mask = local_case(device, torch.float32, 3)
    generator = torch.Generator(device).manual_seed(5)
    w_u, w_v = (torch.randn(26, 4, generator=generator, device=device).requires_grad_() for _ in range(2))
    options = {"window": 3, "causal": causal, "attention_mask": mask}
    names = ("out", "dq", "dk", "dv", "dw_u", "dw_v")
    assert_kernel_matches(aft_local_lowrank, (q, k, v, w_u, w_v), grad, torch.float32, names, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_aft_conv_matches_the_reference(device, dtype, causal, masked):
    inputs, grad, mask = conv_case(device, dtype, kernel_size=4 if causal else 5)
    options = {"causal": causal, "attention_mask": mask if masked else None}
    assert_kernel_matches(aft_conv, inputs, grad, dtype, ("out", "dq", "dk", "dv", "dw"), **options)


def test_aft_conv_head_wider_than_a_channel_block(device):
    """A head of 70 channels spans two programs, which add into its one key's gradient."""
    inputs, grad, mask = conv_case(device, torch.float32, heads=2, head_dim=70, kernel_size=3, seq_len=9)
    options = {"causal": False, "attention_mask": mask}
    assert_kernel_matches(aft_conv, inputs, grad, torch.float32, ("out", "dq", "dk", "dv", "dw"), **options)


@pytest.mark.parametrize("causal", [False, True])
def test_aft_local_and_conv_extreme_keys_and_biases_against_float64(device, causal):
    """|k| and |w| in the hundreds, rows whose window and whose unbiased keys differ by e^±1000: every
    row is folded under its own joint maximum, so nothing underflows."""
    (q, k, v, w), _, mask = local_case(device, torch.float64, 4, seed=6)
    q, k, v, w = q.detach(), k.detach() * 300, v.detach(), w.detach() * 300
    for m in (None, mask):
        with tokenmix.use_backend("triton"):
            out = aft_local(
                q.float(), k.float(), v.float(), w.float(), window=4, causal=causal, attention_mask=m
            )
        expected = reference.aft_local(q, k, v, w, window=4, causal=causal, attention_mask=m)
        assert torch.isfinite(out).all()
        assert_close(out, expected, 1e-4)
    assert_kernel_gradients_finite(
        aft_local, reference.aft_local, dict(q=q, k=k, v=v, w=w), window=4, causal=causal, attention_mask=mask
    )
    (q, k, v, w), _, mask = conv_case(device, torch.float64, kernel_size=3, seed=7)
    q, k, v, w = q.detach(), k.detach() * 300, v.detach(), w.detach() * 300
    with tokenmix.use_backend("triton"):
        out = aft_conv(q.float(), k.float(), v.float(), w.float(), causal=causal, attention_mask=mask)
    expected = reference.aft_conv(q, k, v, w, causal=causal, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert_close(out, expected, 1e-4)
    assert_kernel_gradients_finite(
        aft_conv, reference.aft_conv, dict(q=q, k=k, v=v, w=w), causal=causal, attention_mask=mask
    )


def conv_2d_case(device, dtype, size_x=5, size_y=7, heads=2, head_dim=5, kernel=(3, 5), seed=0, batch=2):
    """A grid whose rows are longer than the kernel's (the flat span wraps across rows) and not square."""
    generator = torch.Generator(device).manual_seed(seed)
    shape = (batch, size_x, size_y, heads, head_dim)
    q, v = (torch.randn(shape, generator=generator, device=device) for _ in range(2))
    k = torch.randn(shape[:-1], generator=generator, device=device)
    w = torch.randn(heads, *kernel, generator=generator, device=device)
    tensors = [t.to(dtype).requires_grad_() for t in (q, k, v, w)]
    grad = torch.randn(shape, generator=generator, device=device).to(dtype)
    mask = torch.rand(batch, size_x, size_y, generator=generator, device=device) > 0.3
    return tensors, grad, mask


@pytest.mark.parametrize(
    "dtype,kernel",
    [(dtype, kernel) for dtype in (torch.float32, torch.bfloat16) for kernel in ((3, 5), (5, 1), (5, 7))]
    + [(torch.float16, (3, 5))],  # (5, 7): wider than its 3×6 grid both ways
)
@pytest.mark.parametrize("masked", [False, True])
def test_aft_conv_2d_matches_the_reference(device, dtype, masked, kernel):
    # (5, 1) and (5, 7) test where the flat span reaches, which one row of a grid shows at half the
    # interpreter's time of two (and (5, 7) on a smaller grid: its band spans all of it); (3, 5) keeps
    # two rows, for dw's sum across them.
    grid = {"size_x": 3, "size_y": 6} if kernel == (5, 7) else {}
    inputs, grad, mask = conv_2d_case(
        device, dtype, kernel=kernel, batch=2 if kernel == (3, 5) else 1, **grid
    )
    options = {"attention_mask": mask if masked else None}
    assert_kernel_matches(aft_conv, inputs, grad, dtype, ("out", "dq", "dk", "dv", "dw"), **options)


def test_aft_conv_2d_extreme_keys_and_biases_against_float64(device):
    """|k| and |w| in the hundreds: finite, and within 1e-3 of float64, gradients included."""
    (q, k, v, w), _, mask = conv_2d_case(device, torch.float64, seed=3)
    q, k, v, w = q.detach(), k.detach() * 300, v.detach(), w.detach() * 300
    with tokenmix.use_backend("triton"):
        out = aft_conv(q.float(), k.float(), v.float(), w.float(), attention_mask=mask)
    assert torch.isfinite(out).all()
    assert_close(out, reference.aft_conv_2d(q, k, v, w, attention_mask=mask), 1e-4)
    assert_kernel_gradients_finite(
        aft_conv, reference.aft_conv_2d, dict(q=q, k=k, v=v, w=w), attention_mask=mask
    )


def test_aft_conv_2d_flattens_the_grid_along_the_narrower_span(device, monkeypatch):
    """A 5 × 1 kernel on a 5 × 7 grid spans ±2 flat positions column-major, ±14 row-major."""
    import tokenmix.kernels.aft as kernels

    windows = []
    banded = kernels.aft_local
    monkeypatch.setattr(kernels, "aft_local", lambda *a: windows.append(a[5]) or banded(*a))
    inputs, _, mask = conv_2d_case(device, torch.float32, kernel=(5, 1))
    with tokenmix.use_backend("triton"):
        aft_conv(*inputs, attention_mask=mask)
    assert windows == [3]


def test_the_old_kernel_name_warns_and_is_aft_locals():
    """Issue 40.6: AFT-local's kernel was aft_banded; it is named as its op and mixer now."""
    from tokenmix.kernels import aft as kernels

    with pytest.warns(DeprecationWarning, match="aft_banded is deprecated; use aft_local"):
        old = kernels.aft_banded
    assert old is kernels.aft_local


def test_aft_simple_kernel_continues_from_a_state(device):
    """The causal kernel from an initial_state (the state's keys as one more key before the rows): equal
    to the reference path's scan from the same state, outputs and the gradients of the inputs and of
    the keys and values folded into the state, across the kernel's time blocks; a row whose state saw
    no key (−inf, 0, 0) starts from nothing."""
    (q, k, v), grad, mask = case(device, torch.float32, seq_len=37)
    mask[1, :9] = False  # row 1's state: no key

    def run_from_state(backend):
        with tokenmix.use_backend("reference"):
            _, state = aft_simple(q[:, :9], k[:, :9], v[:, :9], causal=True, attention_mask=mask[:, :9],
                                  output_final_state=True)  # fmt: skip
        with tokenmix.use_backend(backend):
            out = aft_simple(q[:, 9:], k[:, 9:], v[:, 9:], causal=True, attention_mask=mask[:, 9:],
                             initial_state=state)  # fmt: skip
        return (out, *torch.autograd.grad(out, (q, k, v), grad[:, 9:]))

    assert run_from_state("reference")[0].isfinite().all()
    for name, ours, want in zip(["out", "q", "k", "v"], run_from_state("triton"), run_from_state("reference"),
                                strict=True):  # fmt: skip
        error = relative_error(ours.double(), want.double())
        assert error <= TOLERANCE[torch.float32], f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("causal", [False, True])
def test_banded_kernel_takes_a_share_of_rows_over_keys_in_pieces(device, causal):
    """A context-parallel share's call: its rows at an offset into a longer sequence whose keys and
    values come in pieces (a folded key, the halo, its own, the halo after), through the kernel (the
    rows laid at their offset) against the reference path, outputs and gradients."""
    from tokenmix.functional.aft.exact import Bias
    from tokenmix.functional.aft.local import band_offsets, banded

    (q, k, v), grad, _ = case(device, torch.float32, seq_len=45)
    window, start, rows = 5, 7, 30
    generator = torch.Generator(device).manual_seed(1)
    columns, inside = band_offsets(45, window, causal, device)
    table = torch.randn(45, 45, generator=generator, device=device)
    band = table.gather(1, columns.clamp(0, 44)).masked_fill(~inside, float("-inf"))[:, None]
    centred = band[start : start + rows]
    if causal:  # the recompute's band holds the offsets after a row too
        centred = torch.cat((centred, torch.zeros(rows, 1, window - 1, device=device)), -1)
    bias = Bias("band", (centred,), (q.shape[-1],))
    cuts = (0, 1, start, start + rows, 45)

    def op(q, k, v):
        pieces = [tuple(x[:, a:b, None] for a, b in itertools.pairwise(cuts)) for x in (k, v)]
        share = q[:, start : start + rows, None]
        return banded(share, *pieces, band, window, causal, None, bias, "aft_local", start)

    expected = run("reference", op, (q, k, v), grad[:, start : start + rows])
    got = run("triton", op, (q, k, v), grad[:, start : start + rows])
    for name, ours, want in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        error = relative_error(ours.double(), want.double())
        assert error <= TOLERANCE[torch.float32], f"{name}: relative error {error:.2e}"

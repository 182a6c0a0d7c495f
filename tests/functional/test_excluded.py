"""Excluded terms are selected away (docs/spec.md §0: padding, and future positions when causal): a NaN there
changes no output that does not see it, forward or backward; calls over no positions return empty
results; ``causal`` must be a bool. Every op, both modes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.functional.ops import OPS, OpCase
from tokenmix import functional as F

B, N = 2, 12


def _band(name: str, kernel_size: int) -> OpCase:
    """The table's case with a kernel long enough for the band-matrix path (functional/conv.py's
    BAND_RULE), which takes NaNs apart in its own way."""
    case = OPS[name]

    def inputs(randn, batch, n):
        sequences, parameters = case.inputs(randn, batch, n)
        if parameters:  # lightconv: (H, K)
            return sequences, [randn(parameters[0].shape[0], kernel_size)]
        weight, dim = sequences[1]  # dynamic_conv: (B, N, H, K)
        return [sequences[0], (randn(*weight.shape[:-1], kernel_size), dim)], []

    return dataclasses.replace(case, inputs=inputs)


# Every op of the table (tests/functional/ops.py) over one position dim, and the band paths.
CASES = {name: case for name, case in OPS.items() if case.position_dims == 1}
CASES["lightconv band"], CASES["dynamic_conv band"] = _band("lightconv", 31), _band("dynamic_conv", 15)


def _inputs(name: str, randn=None):
    """The case's call(sequences, **options), its sequence tensors and the dim N is at in each."""
    case = CASES[name]
    generator = torch.Generator().manual_seed(0)
    randn = randn or (lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64))
    sequences, parameters = case.inputs(randn, B, N)

    def call(tensors, causal, **options):
        return case.call(causal)(*tensors, *parameters, **options)

    call.parameters = [p.requires_grad_() for p in parameters]
    return call, [t for t, _ in sequences], [dim for _, dim in sequences]


def _set(tensor: torch.Tensor, dim: int, row: int, position: int, value: float) -> torch.Tensor:
    tensor = tensor.clone()
    index = [slice(None)] * tensor.dim()
    index[0], index[dim] = row, position
    tensor[tuple(index)] = value
    return tensor


def _rows(out: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    """The outputs at the (B, N) positions ``keep`` selects, flattened."""
    out = out.movedim(dim, 1)
    return out[keep]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("where", ["padded", "future"])
def test_a_nan_at_an_excluded_position_changes_nothing_else(name, causal, where):
    if where == "future" and not causal:
        pytest.skip("bidirectional rows see every real position")
    call, tensors, dims = _inputs(name)
    dim = dims[0]  # the output's N is the first input's
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 3], mask[1, :2] = False, False
    row, position = (0, 3) if where == "padded" else (0, N - 1)
    options = {"causal": causal, "attention_mask": mask if where == "padded" else None}
    keep = mask.clone() if where == "padded" else torch.ones(B, N, dtype=torch.bool)
    if where == "future":
        keep[0, position] = False
    for which in range(len(tensors)):
        for value in (float("nan"), float("inf")):
            poisoned = [t.clone().requires_grad_() for t in tensors]
            poisoned[which] = _set(tensors[which], dims[which], row, position, value).requires_grad_()
            clean = [t.clone().requires_grad_() for t in tensors]
            clean[which] = _set(tensors[which], dims[which], row, position, 7.0).requires_grad_()
            outs = [call(ts, **options) for ts in (poisoned, clean)]
            got, want = (_rows(out, dim, keep) for out in outs)
            assert torch.isfinite(got).all(), f"input {which}: {value} leaked into other rows"
            torch.testing.assert_close(got, want, msg=f"input {which}")
            cotangent = torch.zeros_like(outs[0]).movedim(dim, 1)
            cotangent[keep] = torch.randn(cotangent[keep].shape, generator=generator, dtype=torch.float64)
            cotangent = cotangent.movedim(1, dim)
            grads = [  # the op's parameters' gradients (biases, kernels) too
                torch.autograd.grad(out, [*ts, *call.parameters], cotangent, allow_unused=True)
                for out, ts in zip(outs, (poisoned, clean), strict=True)
            ]
            for index, (g, h) in enumerate(zip(*grads, strict=True)):
                if g is None or (where == "future" and which in CASES[name].queries):
                    continue  # a query's row is real: IEEE's 0·NaN in its zero cotangent is PyTorch's too
                g, h = (_set(t, dims[index], row, position, 0.0) if index == which else t for t in (g, h))
                assert torch.isfinite(g).all(), (
                    f"input {which}: {value} leaked into the gradient of input {index}"
                )
                torch.testing.assert_close(g, h, msg=f"input {which}: gradient of input {index}")


@pytest.mark.parametrize("name", CASES)
def test_a_row_that_sees_a_nan_still_says_so(name):
    """Selection, not clean-up: the row whose own value is NaN is not finite (causal)."""
    call, tensors, dims = _inputs(name)
    own = 0 if name.startswith("dynamic_conv") else -1  # its x; the others' values
    tensors[own] = _set(tensors[own], dims[own], 0, N - 1, float("nan"))
    out = call(tensors, causal=True).movedim(dims[0], 1)
    assert not torch.isfinite(out[0, N - 1]).all()
    assert torch.isfinite(out[0, : N - 1]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("name", [n for n in CASES if "band" not in n])
@pytest.mark.parametrize("empty", ["batch", "length"])
def test_no_positions_give_an_empty_result(name, empty):
    call, full, dims = _inputs(name)
    sized = [tuple(0 if (empty == "batch" and axis == 0) or (empty == "length" and axis == dim) else s
                   for axis, s in enumerate(t.shape)) for t, dim in zip(full, dims, strict=True)]  # fmt: skip
    tensors = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in sized]
    for causal in (False, True):
        out = call(tensors, causal=causal)
        assert out.numel() == 0 and out.dim() == call(full, causal=causal).dim()
        out.sum().backward()
        assert all(t.grad is not None and t.grad.shape == t.shape for t in tensors)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("causal", ["no", 1, None])
def test_causal_must_be_a_bool(name, causal):
    call, tensors, _ = _inputs(name)
    with pytest.raises(TypeError, match=r"causal must be True or False"):
        call(tensors, causal=causal)


def test_aft_conv_kernel_and_2d_mask_checks():
    q = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one tap"):
        F.aft_conv(q, q[..., 0], q, torch.randn(2, 0, dtype=torch.float64), causal=True)
    grid = torch.randn(1, 3, 4, 2, 3, dtype=torch.float64)
    mask = torch.ones(1, 3, 4, dtype=torch.bool)
    mask[0, 1, 2] = False
    v = _set(grid, 1, 0, 1, 0.0)
    v[0, 1, 2] = float("nan")
    out = F.aft_conv(grid, grid[..., 0], v, torch.randn(2, 3, 3, dtype=torch.float64), attention_mask=mask)
    assert torch.isfinite(out[mask]).all()


@pytest.mark.parametrize("name", CASES)
def test_meta_tensors_give_the_output_shape(name):
    """No op reads values on the way (``.item()``): meta tensors, as torch.compile's tracing uses, work."""
    call, real, _ = _inputs(name)
    meta, tensors, _ = _inputs(name, lambda *shape: torch.empty(shape, device="meta", dtype=torch.float64))
    for causal in (False, True):
        out = meta(tensors, causal=causal)
        assert out.device.type == "meta" and out.shape == call(real, causal=causal).shape


def test_all_finite_answers_only_what_it_knows():
    """The fast path (no exclusion bookkeeping) is taken only when every entry is finite: a NaN, an inf,
    or finite entries whose sum overflows answer False (the careful path, still exact)."""
    from tokenmix.core.excluded import all_finite

    x = torch.randn(3, 4)
    assert all_finite(x, x.double())
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2] = bad
        assert not all_finite(x, y)
    assert not all_finite(torch.full((2,), 3e38))  # finite, but its sum is not: careful, never wrong

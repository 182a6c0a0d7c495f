"""Excluded terms are selected away (docs/spec.md §0: padding, and future positions when causal): a NaN there
changes no output that does not see it, forward or backward; calls over no positions return empty
results; ``causal`` must be a bool. Every op, both modes."""

from __future__ import annotations

import pytest
import torch

from tokenmix import functional as F

B, N, H = 2, 12, 2


def _ops():
    """name → (call(tensors, causal, mask), tensor shapes (position dim 1 unless 'heads first'),
    position dim, whether it runs causally)."""
    x, head_first = (B, N, 6), (B, H, N, 4)
    return {
        "softmax_attention": (lambda t, **o: F.softmax_attention(*t, **o), [head_first] * 3, 2, True),
        "pointwise_attention": (
            lambda t, **o: F.pointwise_attention(*t, activation="relu2", **o),
            [head_first] * 3,
            2,
            True,
        ),
        "mixed_chunk_attention": (
            lambda t, **o: F.mixed_chunk_attention(*t, chunk_size=5, **o),
            [x] * 5,
            1,
            True,
        ),
        "aft_full": (lambda t, **o: F.aft_full(*t, W_FULL.to(t[0].device), **o), [x] * 3, 1, True),
        "aft_simple": (lambda t, **o: F.aft_simple(*t, **o), [x] * 3, 1, True),
        "aft_local": (
            lambda t, **o: F.aft_local(*t, W_FULL.to(t[0].device), window=3, **o),
            [x] * 3,
            1,
            True,
        ),
        "aft_local_lowrank": (
            lambda t, **o: F.aft_local_lowrank(
                *t, W_FULL[:, :3].to(t[0].device), W_FULL[:, 3:6].to(t[0].device), window=3, **o
            ),
            [x] * 3,
            1,
            True,
        ),
        "aft_conv": (
            lambda t, **o: F.aft_conv(*t, W_CONV.to(t[0].device), **o),
            [(B, N, H, 3), (B, N, H), (B, N, H, 3)],
            1,
            True,
        ),
        "lightconv": (lambda t, **o: F.lightconv(*t, W_CONV[:, :3].to(t[0].device), **o), [x], 1, True),
        "lightconv band": (
            lambda t, **o: F.lightconv(*t, W_BAND.to(t[0].device), **o),
            [x],
            1,
            True,
        ),
        "dynamic_conv": (
            lambda t, **o: F.dynamic_conv(*t, W_DYNAMIC[..., :3].to(t[0].device), **o),
            [x],
            1,
            True,
        ),
        "dynamic_conv band": (
            lambda t, **o: F.dynamic_conv(*t, W_DYNAMIC.to(t[0].device), **o),
            [x],
            1,
            True,
        ),
    }


# Inputs that belong to the row itself (queries): a NaN there is the row's own, not an excluded term.
QUERIES = {"mixed_chunk_attention": (0, 2), "lightconv": (), "lightconv band": (), "dynamic_conv": ()}
QUERIES["dynamic_conv band"] = ()
G = torch.Generator().manual_seed(0)
W_FULL = torch.randn(N, N, generator=G, dtype=torch.float64)
W_CONV = torch.randn(H, 5, generator=G, dtype=torch.float64)
W_BAND = torch.randn(H, 31, generator=G, dtype=torch.float64)
W_DYNAMIC = torch.randn(B, N, H, 15, generator=G, dtype=torch.float64)
OPS = _ops()


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


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("where", ["padded", "future"])
def test_a_nan_at_an_excluded_position_changes_nothing_else(name, causal, where):
    if where == "future" and not causal:
        pytest.skip("bidirectional rows see every real position")
    call, shapes, dim, _ = OPS[name]
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
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
            poisoned[which] = _set(tensors[which], dim, row, position, value).requires_grad_()
            clean = [t.clone().requires_grad_() for t in tensors]
            clean[which] = _set(tensors[which], dim, row, position, 7.0).requires_grad_()
            outs = [call(ts, **options) for ts in (poisoned, clean)]
            got, want = (_rows(out, dim, keep) for out in outs)
            assert torch.isfinite(got).all(), f"input {which}: {value} leaked into other rows"
            torch.testing.assert_close(got, want, msg=f"input {which}")
            cotangent = torch.zeros_like(outs[0]).movedim(dim, 1)
            cotangent[keep] = torch.randn(cotangent[keep].shape, generator=generator, dtype=torch.float64)
            cotangent = cotangent.movedim(1, dim)
            grads = [
                torch.autograd.grad(out, ts, cotangent, allow_unused=True)
                for out, ts in zip(outs, (poisoned, clean), strict=True)
            ]
            for index, (g, h) in enumerate(zip(*grads, strict=True)):
                if g is None or (where == "future" and which in QUERIES.get(name, (0,))):
                    continue  # a query's row is real: IEEE's 0·NaN in its zero cotangent is PyTorch's too
                g, h = (_set(t, dim, row, position, 0.0) if index == which else t for t in (g, h))
                assert torch.isfinite(g).all(), (
                    f"input {which}: {value} leaked into the gradient of input {index}"
                )
                torch.testing.assert_close(g, h, msg=f"input {which}: gradient of input {index}")


@pytest.mark.parametrize("name", OPS)
def test_a_row_that_sees_a_nan_still_says_so(name):
    """Selection, not clean-up: the row whose own value is NaN is not finite (causal)."""
    call, shapes, dim, _ = OPS[name]
    tensors = [torch.randn(shape, dtype=torch.float64) for shape in shapes]
    tensors[-1] = _set(tensors[-1], dim, 0, N - 1, float("nan"))
    out = call(tensors, causal=True).movedim(dim, 1)
    assert not torch.isfinite(out[0, N - 1]).all()
    assert torch.isfinite(out[0, : N - 1]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("name", [n for n in OPS if "band" not in n])
@pytest.mark.parametrize("empty", ["batch", "length"])
def test_no_positions_give_an_empty_result(name, empty):
    call, shapes, dim, _ = OPS[name]
    if name in ("dynamic_conv",):
        pytest.skip("its weight is per position: covered below")
    sized = [tuple(0 if (empty == "batch" and axis == 0) or (empty == "length" and axis == dim) else s
                   for axis, s in enumerate(shape)) for shape in shapes]  # fmt: skip
    tensors = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in sized]
    for causal in (False, True):
        out = call(tensors, causal=causal)
        assert out.numel() == 0 and out.dim() == len(sized[-1] if name != "aft_conv" else sized[0])
        out.sum().backward()
        assert all(t.grad is not None and t.grad.shape == t.shape for t in tensors)


@pytest.mark.parametrize("empty", [(0, N), (B, 0)])
def test_dynamic_conv_over_no_positions(empty):
    x = torch.randn(*empty, 6, requires_grad=True)
    out = F.dynamic_conv(x, torch.randn(*empty, H, 3), causal=True)
    out.sum().backward()
    assert out.shape == x.shape


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("causal", ["no", 1, None])
def test_causal_must_be_a_bool(name, causal):
    call, shapes, _, _ = OPS[name]
    with pytest.raises(TypeError, match=r"causal must be True or False"):
        call([torch.randn(shape, dtype=torch.float64) for shape in shapes], causal=causal)


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


@pytest.mark.parametrize("name", OPS)
def test_meta_tensors_give_the_output_shape(name):
    """No op reads values on the way (``.item()``): meta tensors, as torch.compile's tracing uses, work."""
    call, shapes, _, _ = OPS[name]
    tensors = [torch.empty(shape, device="meta", dtype=torch.float64) for shape in shapes]
    for causal in (False, True):
        out = call(tensors, causal=causal)
        assert out.device.type == "meta" and out.shape == tensors[0 if name == "aft_conv" else -1].shape


def test_all_finite_answers_only_what_it_knows():
    """The fast path (no exclusion bookkeeping) is taken only when every entry is finite: a NaN, an inf,
    or finite entries whose sum overflows answer False (the careful path, still exact)."""
    from tokenmix.functional._excluded import all_finite

    x = torch.randn(3, 4)
    assert all_finite(x, x.double())
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2] = bad
        assert not all_finite(x, y)
    assert not all_finite(torch.full((2,), 3e38))  # finite, but its sum is not: careful, never wrong

"""tests/interpreter.py: the faster interpreter computes what Triton's own does, bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the kernels here run under Triton's interpreter only", allow_module_level=True)

import triton
import triton.language as tl
from triton.runtime import interpreter as stock

from tests import interpreter
from tokenmix.kernels._common import linear_combine, logaddexp


def test_the_faster_parts_are_installed_over_this_triton():
    """Each is installed only over the source it was written against: a new Triton fails here first."""
    assert interpreter.install()
    assert getattr(stock.ScanOps.generic_scan, "by_slices", False), "STOCK_SCAN: Triton's scan changed"
    assert getattr(stock._get_np_dtype, "looked_up", False), "STOCK_TYPES: Triton's types changed"


@triton.jit
def _scans_kernel(decay_ptr, value_ptr, out_ptr, lse_ptr, ROWS: tl.constexpr, COLUMNS: tl.constexpr,
                  AXIS: tl.constexpr, REVERSE: tl.constexpr):  # fmt: skip
    index = tl.arange(0, ROWS)[:, None] * COLUMNS + tl.arange(0, COLUMNS)[None, :]
    decay, value = tl.load(decay_ptr + index), tl.load(value_ptr + index)
    _, out = tl.associative_scan((decay, value), AXIS, linear_combine, reverse=REVERSE)
    tl.store(out_ptr + index, out)
    tl.store(lse_ptr + index, tl.associative_scan(value, AXIS, logaddexp, reverse=REVERSE))


def _scans(decay, value, axis, reverse):
    out, lse = torch.empty_like(value), torch.empty_like(value)
    _scans_kernel[(1,)](decay, value, out, lse, *value.shape, axis, reverse)
    return out, lse


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("reverse", [False, True])
def test_a_scan_by_slices_equals_the_element_by_element_scan(axis, reverse, monkeypatch):
    generator = torch.Generator().manual_seed(axis + 2 * reverse)
    decay = torch.rand(8, 16, generator=generator)
    value = torch.randn(8, 16, generator=generator)
    value[3, 5] = float("-inf")  # logaddexp's −inf branch
    got = _scans(decay, value, axis, reverse)
    monkeypatch.setattr(stock.ScanOps, "generic_scan", stock.ScanOps.generic_scan.stock)
    want = _scans(decay, value, axis, reverse)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), (g - w).abs().max()
    # and both are the recurrence h ← decay·h + value, in float64
    d, v = decay.double(), value.double()
    if reverse:
        d, v = d.flip(axis), v.flip(axis)
    h, rows = torch.zeros_like(v.select(axis, 0)), []
    for step in range(v.shape[axis]):
        h = d.select(axis, step) * h + v.select(axis, step)
        rows.append(h)
    expected = torch.stack(rows, axis)
    expected = expected.flip(axis) if reverse else expected
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("element", [tl.float32, tl.bfloat16, tl.int1, tl.int64, tl.pointer_type(tl.float16)])
@pytest.mark.parametrize("shape", [[4], [2, 8], tl.core.tuple([16, 1]), [tl.constexpr(4), 2]])
def test_a_looked_up_block_type_equals_a_built_one(element, shape):
    init = tl.block_type.__init__
    for _ in range(2):  # the first builds the entry, the second reads it
        built = object.__new__(tl.block_type)
        init.stock(built, element, shape)
        looked_up = tl.block_type(element, shape)
        assert vars(looked_up).keys() == vars(built).keys()
        for name, value in vars(built).items():
            assert getattr(looked_up, name) == value, name
            assert type(getattr(looked_up, name)) is type(value), name
        assert looked_up.shape is not tl.block_type(element, shape).shape  # each its own, as built
        assert stock._get_np_dtype(looked_up) == stock._get_np_dtype.stock(built)
        assert stock._get_np_dtype(element) == stock._get_np_dtype.stock(element)


@pytest.mark.parametrize(
    ("shape", "error"),
    [([3], ValueError), ([2, 6], ValueError), ([tl.constexpr(5)], ValueError), ((2, 8), AssertionError)],
)
def test_a_shape_refused_when_built_is_refused_when_looked_up(shape, error):
    """Not a power of two; a Python tuple (Triton's asserts a list or its own tuple)."""
    with pytest.raises(error):
        tl.block_type.__init__.stock(object.__new__(tl.block_type), tl.float32, shape)
    for _ in range(2):
        with pytest.raises(error):
            tl.block_type(tl.float32, shape)

"""Context-parallel ops (docs/spec.md §14) under gloo with 2 and 4 processes: each rank's outputs and
every gradient equal the same op on the whole sequence (float64, ≤ 1e-10), causal and bidirectional, with
padding, at lengths that are multiples of neither the ranks nor the windows, and with windows longer
than a rank's share (the halo then comes from several ranks); 2-D AFT-conv on a grid split mid-row. The
all-pairs ops also under a zig-zag split (each rank two runs of positions), which the others refuse; AFT's
exact path (every entry recomputed under its joint maximum) at a context-parallel block's offsets and a
share's rows, and the windowed ones' band added offset by offset as on long sequences."""

from __future__ import annotations

import functools
import itertools
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenmix import functional as F
from tokenmix.context import Split
from tokenmix.context import ops as cp
from tokenmix.functional.aft import common as aft_common
from tokenmix.functional.aft import local as aft_local

B, H = 2, 2
pytestmark = pytest.mark.starts_first  # tests/conftest.py


def _cases():
    """name → (whole op, context op, inputs(randn, n): [(tensor, dim N is at)], parameters)."""

    def qkv(randn, n):
        return [(randn(B, n, 4), 1) for _ in range(3)], []

    def heads(randn, n):
        return [(randn(B, H, n, 3), 2) for _ in range(3)], []

    def conv(kernel_size):
        return lambda randn, n: ([(randn(B, n, 4), 1)], [randn(H, kernel_size)])

    def dynamic(kernel_size):
        return lambda randn, n: ([(randn(B, n, 4), 1), (randn(B, n, H, kernel_size), 1)], [])

    return {
        "lightconv K=4": (F.lightconv, cp.lightconv, conv(4)),
        "lightconv K=7": (F.lightconv, cp.lightconv, conv(7)),  # wider than a rank's share at 4 ranks
        "dynamic_conv K=3": (F.dynamic_conv, cp.dynamic_conv, dynamic(3)),
        "dynamic_conv K=8": (F.dynamic_conv, cp.dynamic_conv, dynamic(8)),
        "aft_simple": (F.aft_simple, cp.aft_simple, qkv),
        "aft_local": (
            functools.partial(F.aft_local, window=3),
            functools.partial(cp.aft_local, window=3),
            lambda randn, n: (qkv(randn, n)[0], [randn(n + 2, n + 2)]),
        ),
        "aft_local_lowrank": (
            functools.partial(F.aft_local_lowrank, window=4),
            functools.partial(cp.aft_local_lowrank, window=4),
            lambda randn, n: (qkv(randn, n)[0], [randn(n + 1, 2), randn(n + 1, 2)]),
        ),
        "aft_conv": (
            F.aft_conv,
            cp.aft_conv,
            lambda randn, n: (
                [(randn(B, n, H, 2), 1), (randn(B, n, H), 1), (randn(B, n, H, 2), 1)],
                [randn(H, 3)],
            ),
        ),
        "mixed_chunk_attention C=3": (
            functools.partial(F.mixed_chunk_attention, chunk_size=3),
            functools.partial(cp.mixed_chunk_attention, chunk_size=3),
            lambda randn, n: ([(randn(B, n, 3), 1) for _ in range(4)] + [(randn(B, n, 2), 1)], []),
        ),
        "mixed_chunk_attention C=1": (  # every share starts and ends on a chunk boundary: no halo
            functools.partial(F.mixed_chunk_attention, chunk_size=1),
            functools.partial(cp.mixed_chunk_attention, chunk_size=1),
            lambda randn, n: ([(randn(B, n, 3), 1) for _ in range(4)] + [(randn(B, n, 2), 1)], []),
        ),
        "mixed_chunk_attention C=5": (  # chunks longer than a share at 4 ranks
            functools.partial(F.mixed_chunk_attention, chunk_size=5),
            functools.partial(cp.mixed_chunk_attention, chunk_size=5),
            lambda randn, n: ([(randn(B, n, 3), 1) for _ in range(4)] + [(randn(B, n, 2), 1)], []),
        ),
        "aft_full": (F.aft_full, cp.aft_full, lambda randn, n: (qkv(randn, n)[0], [randn(n + 2, n + 2)])),
        "aft_full_lowrank": (
            lambda q, k, v, u, w_v, **options: F.aft_full(q, k, v, u @ w_v.T, **options),
            cp.aft_full_lowrank,
            lambda randn, n: (qkv(randn, n)[0], [randn(n + 1, 2), randn(n + 1, 2)]),
        ),
        "softmax_attention": (F.softmax_attention, cp.softmax_attention, heads),
        "pointwise_attention": (
            functools.partial(F.pointwise_attention, activation="relu2", alpha=0.5),
            functools.partial(cp.pointwise_attention, activation="relu2", alpha=0.5),
            heads,
        ),
    }


GRID = (3, 5)  # 15 positions: shares of 8 and 7, or 4, 4, 4, 3, none a whole number of rows


def _grid_cases():
    """2-D AFT-conv on a grid flattened row-major (bidirectional only): kernels reaching 6 and 11 flat
    positions each side (the second past a share at either world size)."""

    def whole(q, k, v, w, causal, attention_mask):
        grid = [t.unflatten(1, GRID) for t in (q, k, v)]
        mask = None if attention_mask is None else attention_mask.unflatten(1, GRID)
        return F.aft_conv(*grid, w, causal=causal, attention_mask=mask).flatten(1, 2)

    def inputs(kernel):
        return lambda randn, n: (
            [(randn(B, n, H, 2), 1), (randn(B, n, H), 1), (randn(B, n, H, 2), 1)],
            [randn(H, *kernel)],
        )

    context = functools.partial(cp.aft_conv, grid=GRID)
    return {f"aft_conv {GRID} K={kx}×{ky}": (whole, context, inputs((kx, ky))) for kx, ky in ((3, 3), (5, 3))}


ALL_PAIRS = ("aft_full", "aft_full_lowrank", "softmax_attention", "pointwise_attention")  # also zig-zag
WINDOWED = ("aft_local", "aft_local_lowrank", "aft_conv")  # a share's rows over its keys and the halo's


def _compare(name, causal, masked, total, generator, order="contiguous"):
    whole_op, context_op, inputs = {**_cases(), **_grid_cases()}[name]

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    sequences, parameters = inputs(randn, total)
    mask = None
    if masked:  # left padding on one row, a hole in the other
        mask = torch.ones(B, total, dtype=torch.bool)
        mask[0, :3], mask[1, total // 2] = False, False
    tensors = [t.requires_grad_() for t, _ in sequences] + [p.requires_grad_() for p in parameters]
    out = whole_op(*tensors, causal=causal, attention_mask=mask)
    dim = sequences[0][1]
    keep = torch.ones(B, total, dtype=torch.bool) if mask is None else mask
    keep = keep.view(B, *[1] * (dim - 1), total, *[1] * (out.dim() - dim - 1))
    cotangent = torch.where(keep, randn(*out.shape), torch.zeros(()))  # padded rows are unspecified
    expected = torch.autograd.grad(out, tensors, cotangent)

    split = Split.of(total, order=order)
    local = [split.local(t.detach(), d).requires_grad_() for t, d in sequences]
    params = [p.detach().requires_grad_() for p in parameters]
    local_mask = None if mask is None else split.local(mask)
    got = context_op(*local, *params, split, causal=causal, attention_mask=local_mask)
    where = f"{name} causal={causal} masked={masked} N={total} {order} rank {split.rank} of {split.world}"
    torch.testing.assert_close(
        torch.where(split.local(keep, dim), got, 0.0),
        torch.where(split.local(keep, dim), split.local(out.detach(), dim), 0.0),
        rtol=1e-10, atol=1e-10, msg=where,
    )  # fmt: skip
    grads = torch.autograd.grad(got, local + params, split.local(cotangent, dim))
    for index, (grad, want) in enumerate(zip(grads, expected, strict=True)):
        if index < len(local):
            want = split.local(want, sequences[index][1])
        else:  # a parameter: every rank's part of its gradient, summed (as data parallelism does)
            grad = grad.clone()
            dist.all_reduce(grad)
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10, msg=f"{where}: gradient {index}")
    if causal and name in ALL_PAIRS:  # a NaN key at the last position reaches no earlier row
        poisoned = local[1].detach().clone()
        last = split.ranges[-1][1] == total  # this rank's last row is the sequence's (rank 0's, zig-zag)
        if last:
            poisoned.select(dim, -1).fill_(float("nan"))
        inputs = (local[0], poisoned, local[2], *params)
        again = context_op(*inputs, split, causal=True, attention_mask=local_mask)
        rows = split.length - 1 if last else split.length
        assert torch.isfinite(again.narrow(dim, 0, rows)).all(), where
        assert not (last and torch.isfinite(again.select(dim, -1)).any()), where
        torch.testing.assert_close(again.narrow(dim, 0, rows), got.narrow(dim, 0, rows).detach(), msg=where)


def _poisoned(name, causal, total, generator, order="contiguous"):
    """An op with one input NaN at one position mid-sequence (each input in turn): the same entries NaN
    as the op on the whole sequence, and the others' values equal — a NaN reaches only the rows that see
    it, across ranks too."""
    whole_op, context_op, inputs = _cases()[name]
    sequences, parameters = inputs(
        lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64), total
    )
    split = Split.of(total, order=order)
    for index, (_, dim) in enumerate(sequences):
        for position in (total // 2, total - 3):
            poisoned = [t.clone() for t, _ in sequences]
            entry = (0,) * dim + (position,) + (0,) * (poisoned[index].dim() - dim - 1)
            poisoned[index][entry] = float("nan")  # one entry: a channel, a head, a tap
            want = split.local(whole_op(*poisoned, *parameters, causal=causal), dim)
            local = [split.local(t, d) for t, (_, d) in zip(poisoned, sequences, strict=True)]
            got = context_op(*local, *parameters, split, causal=causal)
            where = f"{name} causal={causal}: input {index} NaN at {position}, {order}, rank {split.rank}"
            assert torch.equal(torch.isnan(got), torch.isnan(want)), where
            torch.testing.assert_close(
                got.nan_to_num(0.0), want.nan_to_num(0.0), rtol=1e-10, atol=1e-10, msg=where
            )


def _refuses_zigzag(total):
    split = Split.of(total, order="zigzag")
    for name, (_, context_op, inputs) in {**_cases(), **_grid_cases()}.items():
        if name in ALL_PAIRS:
            continue
        if name in _grid_cases():
            total = GRID[0] * GRID[1]
            split = Split.of(total, order="zigzag")
        sequences, parameters = inputs(torch.randn, total)
        local = [split.local(t, d) for t, d in sequences]
        with pytest.raises(ValueError, match=r"this op takes a contiguous split .* the split is 'zigzag'"):
            context_op(*local, *parameters, split, causal=name not in _grid_cases())


def _worker(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cp.ROW_BLOCK = 4  # the all-pairs forms' query blocks: a rank's share crosses them
    try:
        total = 13 if world == 2 else 9  # shares of 7 and 6, or 3, 2, 2, 2 (shorter than the windows)
        for seed, case in enumerate(itertools.product(_cases(), (False, True), (False, True), (total,))):
            _compare(*case, torch.Generator().manual_seed(seed))  # the same inputs on every rank
            if case[0] in ALL_PAIRS:
                _compare(*case, torch.Generator().manual_seed(seed), order="zigzag")
            if case[0].startswith("aft_full"):  # every entry by the exact path underflowed ones take
                with mock.patch.dict(aft_common.TINY, {torch.float64: float("inf")}):
                    _compare(*case, torch.Generator().manual_seed(seed), order="zigzag")
            if case[0] in WINDOWED:  # every entry exact (the share's band as the recompute's biases), and
                with mock.patch.dict(aft_common.TINY, {torch.float64: float("inf")}):
                    _compare(*case, torch.Generator().manual_seed(seed))
                with mock.patch.object(aft_local, "DENSE_BAND_SIZE", 0):  # the band offset by offset
                    _compare(*case, torch.Generator().manual_seed(seed))
        for seed, (name, causal) in enumerate(itertools.product(_cases(), (True, False))):
            _poisoned(name, causal, total, torch.Generator().manual_seed(seed))
        for seed, (name, masked) in enumerate(itertools.product(_grid_cases(), (False, True))):
            _compare(name, False, masked, GRID[0] * GRID[1], torch.Generator().manual_seed(seed))
            with mock.patch.dict(aft_common.TINY, {torch.float64: float("inf")}):  # every entry exact
                _compare(name, False, masked, GRID[0] * GRID[1], torch.Generator().manual_seed(seed))
        if world == 4:  # the others refuse a zig-zag split in one line
            _refuses_zigzag(total)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_ops_equal_the_whole_sequence(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "store")), nprocs=world)

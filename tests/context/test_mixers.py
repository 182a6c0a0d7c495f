"""Every shipped mixer under a context-parallel group (docs/spec.md §14), gloo with 2 processes: each
rank's share of the output and of x's gradient, and every parameter's gradient summed over the ranks,
equal the mixer on the whole sequence (float64, ≤ 1e-9), causal and bidirectional, with padding; RoPE and
the position biases at the global positions; AFT-conv on a 2-D grid too. The all-pairs mixers also under a
causal zig-zag split; the others refuse it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tokenmix
from tests.mixers.options import SMALL_OPTIONS
from tokenmix.context import Split
from tokenmix.context import ops as cp_ops

B, N, DIM = 2, 13, 16


def _compare(
    name: str,
    causal: bool,
    masked: bool,
    order: str = "contiguous",
    options: dict | None = None,
    length: int = N,
) -> None:
    torch.manual_seed(0)  # the same mixer and inputs on every rank
    options = SMALL_OPTIONS.get(name, {}) if options is None else options
    mixer = tokenmix.create_mixer(name, DIM, causal=causal, **options).double()
    x = torch.randn(B, length, DIM, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(B, length, dtype=torch.bool)
        mask[0, :3], mask[1, 6] = False, False
    keep = (torch.ones(B, length, dtype=torch.bool) if mask is None else mask)[..., None]
    out = mixer(x, mask)
    cotangent = torch.where(keep, torch.randn(out.shape, dtype=torch.float64), 0.0)
    parameters = [p for p in mixer.parameters() if p.requires_grad]
    expected = torch.autograd.grad(out, [x, *parameters], cotangent)

    split = Split.of(length, order=order)
    local = split.local(x.detach()).requires_grad_()
    got = mixer(local, None if mask is None else split.local(mask), context=split)
    where = f"{name} {options} causal={causal} masked={masked} {order} rank {split.rank}"
    here = split.local(keep)
    torch.testing.assert_close(
        torch.where(here, got, 0.0),
        torch.where(here, split.local(out.detach()), 0.0),
        rtol=1e-9,
        atol=1e-9,
        msg=where,
    )
    grads = torch.autograd.grad(got, [local, *parameters], split.local(cotangent), allow_unused=True)
    torch.testing.assert_close(grads[0], split.local(expected[0]), rtol=1e-9, atol=1e-9, msg=f"{where}: x")
    for parameter, grad, want in zip(parameters, grads[1:], expected[1:], strict=True):
        grad = torch.zeros_like(parameter) if grad is None else grad.clone()
        dist.all_reduce(grad)  # what data parallelism does with a parameter's gradient
        torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-9, msg=f"{where}: {parameter.shape}")


def _takes_zigzag(name: str) -> bool:
    return "zigzag" in tokenmix.create_mixer(name, DIM, **SMALL_OPTIONS.get(name, {})).split_orders


def _others_refuse_zigzag() -> None:
    split = Split.of(N, order="zigzag")
    taking = {name for name in tokenmix.list_mixers() if _takes_zigzag(name)}
    assert {"softmax", "pointwise", "gau", "aft_full", "identity"} <= taking
    for name in sorted(set(tokenmix.list_mixers()) - taking):
        mixer = tokenmix.create_mixer(name, DIM, causal=True, **SMALL_OPTIONS.get(name, {}))
        with pytest.raises(ValueError, match=r"context is split in 'zigzag' order; .* takes 'contiguous'"):
            mixer(torch.randn(B, split.length, DIM), context=split)


def _worker(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cp_ops.ROW_BLOCK = 4  # the all-pairs forms' query blocks: a rank's share crosses them
    try:
        for name, causal, masked in itertools.product(tokenmix.list_mixers(), (False, True), (False, True)):
            _compare(name, causal, masked)
            if causal and _takes_zigzag(name):  # the all-pairs mixers, balanced when causal
                _compare(name, causal, masked, "zigzag")
        for masked in (False, True):  # a 2-D grid of 3 × 5, split mid-row
            _compare("aft_conv", False, masked, options={"grid": (3, 5), "kernel_size": 3}, length=15)
        _others_refuse_zigzag()
    finally:
        dist.destroy_process_group()


def test_every_mixer_under_two_ranks_equals_the_whole_sequence(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store")), nprocs=2)

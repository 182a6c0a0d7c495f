"""The table of public ops that every cross-cutting op test parametrises over (issue 40.5): how to call
each op, small options that make its structure show at test lengths, its inputs, its float64 oracle
(tests/reference.py), its recurrent state type, whether it packs, and its decoding forms.
``test_every_public_op_is_in_the_table`` fails when an op of ``tokenmix.functional`` is missing here, so
a new op is added once, here, and the packing, compile, signature and oracle tests take it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tests import reference
from tokenmix import functional as F

Inputs = tuple[list[tuple[torch.Tensor, int]], list[torch.Tensor]]


@dataclass(frozen=True)
class OpCase:
    """One op. ``inputs(randn, batch, n)``: its sequence inputs, each with the dim N is at, and its
    parameters (tensors without N), drawn by ``randn(*shape)``."""

    op: Callable
    inputs: Callable[[Callable[..., torch.Tensor], int, int], Inputs]
    options: dict = field(default_factory=dict)
    oracle: Callable | None = None  # the float64 equation, same call (None: tested through another case)
    state: type | None = None  # the state type of a recurrent op
    packs: bool = True  # takes cu_seqlens
    causal: bool = True  # has a causal form
    decoding: tuple[str, ...] = ()  # the public cached / step forms of the op
    position_dims: int = 1  # 2 for a grid: the dims from N's on that a padding mask covers
    kernel: bool = True  # has a Triton kernel (softmax attention is SDPA's)
    kernel_of: str | None = None  # the op whose kernel it runs on, where not its own
    queries: tuple[int, ...] = (0,)  # the sequence inputs that are each row's own (a NaN there is the row's)

    def kernel_name(self, name: str) -> str | None:
        """The kernel this op (the table's ``name``) runs on, named as the op it belongs to."""
        return (self.kernel_of or name) if self.kernel else None

    def call(self, causal: bool) -> Callable[..., torch.Tensor]:
        """op(*sequences, *parameters, **keywords) with this case's options and ``causal``."""
        return lambda *tensors, **keywords: self.op(*tensors, causal=causal, **self.options, **keywords)


def _heads(randn, batch, n):
    return [(randn(batch, 2, n, 3), 2) for _ in range(3)], []


def _qkv(randn, batch, n, *parameters):
    return [(randn(batch, n, 4), 1) for _ in range(3)], list(parameters)


def _lowrank_oracle(q, k, v, u, w, **options):
    return reference.aft_local(q, k, v, u @ w.T, **options)


OPS: dict[str, OpCase] = {
    "softmax_attention": OpCase(
        F.softmax_attention, _heads, oracle=reference.softmax_attention, kernel=False,
        decoding=("softmax_attention_cached", "softmax_attention_step"),
    ),
    "pointwise_attention": OpCase(
        F.pointwise_attention, _heads, {"activation": "relu2"}, reference.pointwise_attention,
        decoding=("pointwise_attention_cached", "pointwise_attention_step"),
    ),
    "mixed_chunk_attention": OpCase(
        F.mixed_chunk_attention,
        lambda randn, batch, n: ([(randn(batch, n, 3), 1) for _ in range(4)] + [(randn(batch, n, 2), 1)], []),
        {"chunk_size": 3}, reference.mixed_chunk_attention, F.MixedChunkState, queries=(0, 2),
    ),
    "aft_full": OpCase(
        F.aft_full, lambda randn, batch, n: _qkv(randn, batch, n, randn(n, n)), oracle=reference.aft_full,
        decoding=("aft_full_cached", "aft_cached"),
    ),
    "aft_simple": OpCase(
        F.aft_simple, _qkv, oracle=reference.aft_simple, state=F.AFTSimpleState, decoding=("aft_accumulate",)
    ),
    "aft_local": OpCase(
        F.aft_local, lambda randn, batch, n: _qkv(randn, batch, n, randn(n, n)), {"window": 2},
        reference.aft_local, F.AFTWindowState,
    ),
    "aft_local_lowrank": OpCase(
        F.aft_local_lowrank, lambda randn, batch, n: _qkv(randn, batch, n, randn(n, 2), randn(n, 2)),
        {"window": 2}, _lowrank_oracle, F.AFTWindowState, kernel_of="aft_local",
    ),
    "aft_conv": OpCase(
        F.aft_conv,
        lambda randn, batch, n: (
            [(randn(batch, n, 2, 2), 1), (randn(batch, n, 2), 1), (randn(batch, n, 2, 2), 1)], [randn(2, 3)]
        ),
        oracle=reference.aft_conv, state=F.AFTWindowState,
    ),
    "aft_conv_2d": OpCase(  # the same op on a grid: (B, X, Y, …), bidirectional, batches of grids when packed
        F.aft_conv,
        lambda randn, batch, n: (
            [(randn(batch, 3, 3, 2, 3), 1), (randn(batch, 3, 3, 2), 1), (randn(batch, 3, 3, 2, 3), 1)],
            [randn(2, 3, 3)],
        ),
        oracle=lambda *tensors, causal, **options: reference.aft_conv_2d(*tensors, **options),
        packs=False, causal=False, position_dims=2, kernel_of="aft_conv",
    ),
    "lightconv": OpCase(
        F.lightconv, lambda randn, batch, n: ([(randn(batch, n, 4), 1)], [randn(2, 3)]),
        oracle=reference.lightconv, state=F.ConvWindowState, queries=(),
    ),
    "dynamic_conv": OpCase(
        F.dynamic_conv, lambda randn, batch, n: ([(randn(batch, n, 4), 1), (randn(batch, n, 2, 3), 1)], []),
        oracle=reference.dynamic_conv, state=F.ConvWindowState, queries=(1,),
    ),
}  # fmt: skip
PACKED = [name for name, case in OPS.items() if case.packs]
PACKED_KERNELS = [name for name in PACKED if OPS[name].kernel]  # take a packed row whole in their kernel
KERNELS = sorted({case.kernel_name(name) for name, case in OPS.items() if case.kernel})  # one per kernel

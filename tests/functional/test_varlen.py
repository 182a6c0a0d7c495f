"""docs/spec.md §8 for every functional op: a packed call (cu_seqlens, B = 1) equals the op on each
segment alone — outputs and every gradient, float64, causal and bidirectional, with one-token and empty
segments — and malformed cu_seqlens is refused naming it. ``packing=`` (the plan made once) is the same call
as ``cu_seqlens=``."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.functional.ops import OPS, PACKED
from tests.reference import assert_close
from tokenmix import functional as F
from tokenmix.core.packing import Packing

CU_SEQLENS = [
    0,
    1,
    1,
    5,
    12,
    12,
    16,
    25,
    35,
]  # 1, empty, 4, 7, empty, 4, 9, 10 (9 and 10 share a padded batch)
N = CU_SEQLENS[-1]


def randn(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def case(name: str, causal: bool, generator: torch.Generator, n: int = N):
    """(op(*sequences, *parameters, cu_seqlens=None), sequences of ``n`` positions with the dim they are
    at, parameters): the op's entry in tests/functional/ops.py, as one packed row (B = 1)."""
    sequences, parameters = OPS[name].inputs(lambda *shape: randn(generator, *shape), 1, n)
    return OPS[name].call(causal), sequences, parameters


def segment(tensor: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
    return tensor.narrow(dim, start, end - start)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", PACKED)
def test_a_packed_call_equals_each_segment_alone(name, causal):
    generator = torch.Generator().manual_seed(PACKED.index(name) + 100 * causal)
    op, sequences, parameters = case(name, causal, generator)
    leaves = [t.requires_grad_() for t, _ in sequences] + [p.requires_grad_() for p in parameters]
    packed = op(*leaves, cu_seqlens=torch.tensor(CU_SEQLENS))
    out_dim = sequences[0][1]
    grad = randn(generator, *packed.shape)
    got = torch.autograd.grad(packed, leaves, grad)
    expected = [torch.zeros_like(leaf) for leaf in leaves]
    for start, end in itertools.pairwise(CU_SEQLENS):
        if start == end:
            continue
        alone = op(*(segment(t, d, start, end) for t, d in sequences), *parameters)
        assert_close(segment(packed, out_dim, start, end), alone, 1e-10, what=f"{name} [{start}, {end})")
        parts = torch.autograd.grad(alone, leaves, segment(grad, out_dim, start, end), allow_unused=True)
        for index, part in enumerate(parts):
            if part is not None:
                expected[index] = expected[index] + part
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert_close(g, e, 1e-10, what=f"{name} gradient of input {index}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", PACKED)
def test_a_plan_made_once_is_the_same_call_as_its_cu_seqlens(name, causal):
    generator = torch.Generator().manual_seed(PACKED.index(name))
    op, sequences, parameters = case(name, causal, generator)
    inputs = [t for t, _ in sequences] + parameters
    cu_seqlens = torch.tensor(CU_SEQLENS)
    expected = op(*inputs, cu_seqlens=cu_seqlens)
    assert torch.equal(op(*inputs, packing=Packing.of(cu_seqlens)), expected)
    with pytest.warns(DeprecationWarning, match="pass the plan as packing="):
        assert torch.equal(op(*inputs, cu_seqlens=Packing.of(cu_seqlens)), expected)


def test_a_plan_is_checked_against_the_call():
    q = torch.randn(1, N, 4)
    packing = Packing.of(torch.tensor(CU_SEQLENS))
    with pytest.raises(ValueError, match="cu_seqlens and packing together"):
        F.aft_simple(q, q, q, cu_seqlens=torch.tensor(CU_SEQLENS), packing=packing)
    with pytest.raises(ValueError, match=f"packing was planned for N={N}, the input has N={N - 1}"):
        F.aft_simple(q[:, 1:], q[:, 1:], q[:, 1:], packing=packing)
    with pytest.raises(ValueError, match="packing and attention_mask together"):
        F.lightconv(q, torch.randn(2, 3), attention_mask=torch.ones(1, N), packing=packing)
    with pytest.raises(
        TypeError, match=r"packing must be a Packing \(Packing.of\(cu_seqlens\)\), got Tensor"
    ):
        F.aft_simple(q, q, q, packing=torch.tensor(CU_SEQLENS))
    with pytest.raises(TypeError, match="cu_seqlens must be an int64/int32 tensor"):
        Packing.of(torch.tensor([0.0, 3.0]))


@pytest.mark.parametrize(
    "cu_seqlens,match",
    [
        ([1, N], f"start at 0 and end at N={N}"),
        ([0, N - 1], f"start at 0 and end at N={N}"),
        ([0, 8, 4, N], "be non-decreasing"),
    ],
)
def test_malformed_cu_seqlens_is_refused_naming_it(cu_seqlens, match):
    q = torch.randn(1, N, 4)
    with pytest.raises(ValueError, match=f"cu_seqlens must {match}"):
        F.aft_simple(q, q, q, cu_seqlens=torch.tensor(cu_seqlens))


def test_cu_seqlens_needs_batch_one_no_mask_and_an_int_tensor():
    q = torch.randn(2, N, 4)
    cu = torch.tensor([0, 5, N])
    with pytest.raises(ValueError, match=r"cu_seqlens .* batch size must be 1, got 2"):
        F.softmax_attention(q[:, None], q[:, None], q[:, None], cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens and attention_mask together"):
        F.lightconv(q[:1], torch.randn(2, 3), attention_mask=torch.ones(1, N), cu_seqlens=cu)
    with pytest.raises(TypeError, match="cu_seqlens must be an int64/int32 tensor"):
        F.aft_simple(q[:1], q[:1], q[:1], cu_seqlens=[0, 12])
    with pytest.raises(ValueError, match="cu_seqlens with initial_state"):
        F.aft_simple(q[:1], q[:1], q[:1], causal=True, cu_seqlens=cu, output_final_state=True)


def test_no_segment_is_padded_by_an_eighth_of_its_length():
    """The reference path's buckets: 4097 and 5120 once shared width 5120 (+25 % for the 4097s)."""
    from tokenmix.core.packing import plan

    generator = torch.Generator().manual_seed(0)
    cases = [[4097] * 10 + [5120], list(range(1, 300)), [1, 2, 3, 8, 9, 16, 17, 1023, 1024, 1025, 1151]]
    cases += [torch.randint(1, 20000, (50,), generator=generator).tolist() for _ in range(20)]
    for lengths in cases:
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)])
        packing = plan(cu_seqlens, torch.device("cpu"))
        for bucket in packing.buckets:
            width = bucket.mask.shape[1]
            for segment in bucket.segments.tolist():
                assert width - lengths[segment] < lengths[segment] / 8, (lengths[segment], width)
        computed = sum(bucket.mask.numel() for bucket in packing.buckets)
        assert computed < 1.125 * sum(lengths)

"""Packed segments (cu_seqlens) through the kernels: under forced ``triton`` each segment's outputs and
every gradient equal the reference path on that segment alone (float32; the interpreter on the CPU);
every kernel takes the packed row whole, in one call; a NaN in one segment reaches no other."""

from __future__ import annotations

import itertools

import pytest
import torch

import tokenmix
from tests.functional.ops import PACKED_KERNELS
from tests.functional.test_varlen import CU_SEQLENS, case, segment
from tests.mixers.test_varlen import SMALL_OPTIONS
from tests.reference import assert_close

KERNEL_OPS = PACKED_KERNELS  # every op whose kernel takes a packed row whole (tests/functional/ops.py)


# float32: against the reference path, to the issue's 1e-5. Half precision (the kernels' other dot
# paths): against the same kernels on each segment alone, whose rounding the packed call shares.
PACKED_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", list(PACKED_TOLERANCE), ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", KERNEL_OPS)
def test_packed_kernels_equal_the_reference_per_segment(device, name, causal, dtype):
    check_packed_kernel(device, name, causal, dtype, CU_SEQLENS, KERNEL_OPS.index(name) + 7 * causal)


# Segments longer than the kernels' blocks (16 rows under the interpreter, pointwise attention's up to
# 64): 70 and 67 rows span five blocks of 16 and two of 64 each, and the last segment starts mid-block
# (at 73), so every program's segment offsets, its table of (segment, block) pairs and its boundary
# masks are crossed, forward and backward.
LONG_SEQLENS = [0, 70, 73, 140]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", KERNEL_OPS)
def test_packed_segments_of_several_blocks_equal_the_reference(device, name, causal):
    check_packed_kernel(device, name, causal, torch.float32, LONG_SEQLENS, 50 + KERNEL_OPS.index(name))


def check_packed_kernel(device, name, causal, dtype, cu_seqlens, seed):
    """The op under forced ``triton`` on the packed row: each segment's outputs, and every gradient,
    equal the op on that segment alone (the reference path in float32; in half precision the same
    kernels)."""
    generator = torch.Generator().manual_seed(seed)
    op, sequences, parameters = case(name, causal, generator, cu_seqlens[-1])
    tolerance = PACKED_TOLERANCE[dtype]
    sequences = [(t.to(device, dtype), d) for t, d in sequences]
    leaves = [t.requires_grad_() for t, _ in sequences] + [
        p.to(device, dtype).requires_grad_() for p in parameters
    ]
    inputs, weights = leaves[: len(sequences)], leaves[len(sequences) :]
    with tokenmix.use_backend("triton"):
        packed = op(*inputs, *weights, cu_seqlens=torch.tensor(cu_seqlens, device=device))
    out_dim = sequences[0][1]
    grad = torch.randn(packed.shape, generator=generator).to(device, dtype)
    got = torch.autograd.grad(packed, leaves, grad)
    # Summed over the segments in float32: in half precision the sum's own rounding (a weight's gradient
    # gathers every segment's) would otherwise count against the kernel.
    expected = [torch.zeros_like(leaf, dtype=torch.float32) for leaf in leaves]
    with tokenmix.use_backend("reference" if dtype == torch.float32 else "triton"):
        for start, end in itertools.pairwise(cu_seqlens):
            if start == end:
                continue
            alone = op(
                *(segment(t, d, start, end) for t, (_, d) in zip(inputs, sequences, strict=True)), *weights
            )
            got_out = segment(packed, out_dim, start, end)
            assert_close(got_out.float(), alone.float(), tolerance, what=f"{name} [{start}, {end})")
            parts = torch.autograd.grad(alone, leaves, segment(grad, out_dim, start, end), allow_unused=True)
            expected = [e if p is None else e + p.float() for e, p in zip(expected, parts, strict=True)]
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert_close(g.float(), e, tolerance, what=f"{name} gradient of input {index}")


def kernel_launches(monkeypatch) -> list[str]:
    """The name of every Triton kernel launched from then on (compiled or interpreted), in order: what
    reaches the device, forward and backward, whichever Python entry led there."""
    import triton.runtime.interpreter
    import triton.runtime.jit

    launched = []
    for cls in (triton.runtime.jit.JITFunction, triton.runtime.interpreter.InterpretedFunction):
        run = cls.run

        def counted(self, *args, _run=run, **kwargs):
            launched.append(self.fn.__name__)
            return _run(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", counted)
    return launched


@pytest.mark.parametrize("name", KERNEL_OPS)
def test_packed_kernels_take_every_segment_in_one_launch(device, name, monkeypatch):
    """Each kernel takes the packed segments itself (programs offset to their segment, or taps that
    never cross one), so a row of eight segments launches, forward and backward, exactly the kernels
    the same row launches unpacked — one launch each, not one per group of similar lengths."""
    launched = kernel_launches(monkeypatch)
    generator = torch.Generator().manual_seed(3)
    op, sequences, parameters = case(name, True, generator)
    inputs = [t.float().to(device).requires_grad_() for t, _ in sequences]
    weights = [p.float().to(device) for p in parameters]
    counts = []
    with tokenmix.use_backend("triton"):
        for cu_seqlens in (torch.tensor(CU_SEQLENS, device=device), None):
            out = op(*inputs, *weights, cu_seqlens=cu_seqlens)
            forward = len(launched)
            torch.autograd.grad(out, inputs, torch.ones_like(out))
            counts.append((launched[:forward], launched[forward:]))
            launched.clear()
    (packed_forward, packed_backward), (whole_forward, whole_backward) = counts
    assert packed_forward == whole_forward and len(packed_forward) >= 1, packed_forward
    assert packed_backward == whole_backward and len(packed_backward) >= 1, packed_backward


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", KERNEL_OPS)
def test_a_nan_in_one_packed_segment_reaches_no_other(device, name, causal):
    """A NaN in one segment's keys and values: every other segment's outputs are as without it, and the
    segment's own NaN outputs are where the op on that segment alone puts them."""
    generator = torch.Generator().manual_seed(11 + KERNEL_OPS.index(name))
    op, sequences, parameters = case(name, causal, generator)
    inputs = [t.float().to(device) for t, _ in sequences]
    weights = [p.float().to(device) for p in parameters]
    poisoned_start, poisoned_end = CU_SEQLENS[3], CU_SEQLENS[4]  # the segment [5, 12)
    for tensor, (_, dim) in list(zip(inputs, sequences, strict=True))[1:]:  # every input but the first
        tensor.narrow(dim, poisoned_start + 3, 1).fill_(float("nan"))
    with tokenmix.use_backend("triton"):
        packed = op(*inputs, *weights, cu_seqlens=torch.tensor(CU_SEQLENS, device=device))
    out_dim = sequences[0][1]
    with tokenmix.use_backend("reference"):
        for start, end in itertools.pairwise(CU_SEQLENS):
            if start == end:
                continue
            alone = op(
                *(segment(t, d, start, end) for t, (_, d) in zip(inputs, sequences, strict=True)), *weights
            )
            got = segment(packed, out_dim, start, end)
            if (start, end) != (poisoned_start, poisoned_end):
                assert_close(got, alone, 1e-5, what=f"{name} [{start}, {end})")
                continue
            assert torch.equal(got.isnan(), alone.isnan()), f"{name}: NaN where the segment alone has none"
            finite = ~alone.isnan()
            assert_close(got[finite], alone[finite], 1e-5, what=f"{name} poisoned segment, finite part")


# The kernel entry each mixer's packed row goes through.
MIXER_OPS = {
    "pointwise": "pointwise_attention",
    "gau": "pointwise_attention",
    "flash": "mixed_chunk_attention",
    "aft_full": "aft_full",
    "aft_simple": "aft_simple",
    "aft_local": "aft_local",
    "aft_conv": "aft_conv",
    "lightconv": "lightconv",
    "dynamic_conv": "dynamic_conv",
}


def test_every_mixer_with_a_kernel_is_listed():
    """Every mixer tokenmix ships has a kernel that takes packed rows, checked below (softmax has no
    kernel: SDPA; a control has no op; the tests' examples have no kernel)."""
    shipped = {
        name
        for name in tokenmix.list_mixers()
        if tokenmix.mixer_info(name).cls.__module__.startswith("tokenmix.")
    }
    controls = {name for name in shipped if tokenmix.mixer_info(name).control}
    assert shipped - {"softmax"} - controls == set(MIXER_OPS)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(MIXER_OPS))
def test_packed_mixers_run_one_launch_equal_to_each_segment_alone(device, name, causal, monkeypatch):
    """A mixer hands a packed row to its kernel whole (its other layers are per position; RoPE counts
    each segment from 0): one launch, and each segment's outputs and input gradients equal the mixer on
    that segment alone."""
    launched = kernel_launches(monkeypatch)
    torch.manual_seed(5)
    accepted = tokenmix.mixer_info(name).options
    options = {key: value for key, value in {"heads": 4, "rope": True}.items() if key in accepted}
    options.update(SMALL_OPTIONS.get(name, {}))
    mixer = tokenmix.create_mixer(name, 16, causal=causal, **options).to(device)
    x = torch.randn(1, CU_SEQLENS[-1], 16, device=device, requires_grad=True)
    with tokenmix.use_backend("triton"):
        mixer(x)
        whole, launched[:] = list(launched), []
        packed = mixer(x, cu_seqlens=torch.tensor(CU_SEQLENS, device=device))
    assert launched == whole and whole  # the row's kernels, each launched once for all its segments
    grad = torch.randn_like(packed)
    (got,) = torch.autograd.grad(packed, x, grad)
    with tokenmix.use_backend("reference"):
        for start, end in itertools.pairwise(CU_SEQLENS):
            if start == end:
                continue
            alone = mixer(x[:, start:end])
            assert_close(packed[:, start:end], alone, 1e-5, what=f"{name} [{start}, {end})")
            (expected,) = torch.autograd.grad(alone, x, grad[:, start:end])
            assert_close(got[:, start:end], expected[:, start:end], 1e-5, what=f"{name} dx [{start}, {end})")


def host_reads(monkeypatch) -> list[str]:
    """Every read of a tensor's values on the host from then on (``item``, ``tolist``, ``bool``, ``int``,
    ``float``, an index): on a GPU each one waits for the device (a sync)."""
    reads = []
    for method in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            reads.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    return reads


@pytest.mark.parametrize("depth", [1, 3])
def test_a_packed_model_reads_the_segment_lengths_the_same_few_times_at_any_depth(device, monkeypatch, depth):
    """The kernels' block tables need the lengths on the host (a device sync): a model checks and plans
    cu_seqlens once and hands the plan to every layer, so a packed forward and backward read tensor
    values on the host the same few times whatever the depth, never once per layer or per kernel call."""
    from tokenmix.models import SequenceClassifier

    torch.manual_seed(0)
    model = SequenceClassifier(256, 3, 16, depth=depth, mixer="pointwise", mixer_options={"heads": 2})
    tokens = torch.randint(0, 256, (1, CU_SEQLENS[-1]), device=device)
    cu_seqlens = torch.tensor(CU_SEQLENS, device=device)
    reads = host_reads(monkeypatch)
    with tokenmix.use_backend("triton"):
        model.to(device)(tokens, cu_seqlens=cu_seqlens).sum().backward()
    assert reads == ["__bool__", "tolist"], reads  # the tokens' range; cu_seqlens, checked and planned

"""The kernels are torch custom ops (and so is the reference path's one data-dependent step, AFT's exact
recomputation under torch.compile): their schemas, fake (meta) implementations and autograd
registrations pass torch.library.opcheck, and torch.compile traces a call through them in one graph."""

from __future__ import annotations

import sys

import pytest
import torch
import triton

import tokenmix
import tokenmix.kernels.aft
import tokenmix.kernels.conv
import tokenmix.kernels.flash
import tokenmix.kernels.pointwise_attention  # registers the ops
from tests.functional.ops import PACKED_KERNELS
from tokenmix import functional
from tokenmix.functional.aft import exact as _aft_exact


def _randn(generator, *shape, requires_grad=True):
    return torch.randn(*shape, generator=generator).requires_grad_(requires_grad)


def calls(generator):
    """(name, op, tensors, options) for every op with a kernel, on small odd shapes."""
    bnd = (2, 11, 6)
    mask = torch.rand(2, 11, generator=generator) > 0.2
    chunked = {"chunk_size": 4, "causal": True, "attention_mask": mask}
    return [
        ("pointwise_attention", functional.pointwise_attention,
         [_randn(generator, 2, 3, 11, 5) for _ in range(3)], {"activation": "relu2", "causal": True}),
        ("mixed_chunk_attention", functional.mixed_chunk_attention,
         [_randn(generator, *bnd) for _ in range(5)], chunked),
        ("aft_simple", functional.aft_simple, [_randn(generator, *bnd) for _ in range(3)], {"causal": True}),
        ("aft_full", functional.aft_full,
         [*(_randn(generator, *bnd) for _ in range(3)), _randn(generator, 12, 12)], {"attention_mask": mask}),
        ("aft_local", functional.aft_local,
         [*(_randn(generator, *bnd) for _ in range(3)), _randn(generator, 11, 11)], {"window": 3}),
        ("aft_conv", functional.aft_conv,
         [_randn(generator, 2, 11, 2, 3), _randn(generator, 2, 11, 2), _randn(generator, 2, 11, 2, 3),
          _randn(generator, 2, 3)], {"causal": True}),
        ("lightconv", functional.lightconv, [_randn(generator, *bnd), _randn(generator, 2, 3)], {}),
        ("dynamic_conv", functional.dynamic_conv,
         [_randn(generator, *bnd), _randn(generator, 2, 11, 2, 3)], {"causal": True}),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(8), ids=[call[0] for call in calls(torch.Generator())])
def test_compile_traces_through_the_kernel_in_one_graph(index):
    generator = torch.Generator().manual_seed(index)
    _, op, tensors, options = calls(generator)[index]
    grad = None
    results = []
    with tokenmix.use_backend("triton"):
        for run in (op, torch.compile(op, backend="aot_eager", fullgraph=True, dynamic=False)):
            out = run(*tensors, **options)
            grad = torch.randn(out.shape, generator=generator) if grad is None else grad
            results.append((out, *torch.autograd.grad(out, tensors, grad)))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


def opcheck_cases():
    generator = torch.Generator().manual_seed(0)
    bnd = (2, 11, 6)
    mask = torch.rand(2, 11, generator=generator) > 0.2

    def randn(*shape):
        return _randn(generator, *shape)

    ops = torch.ops.tokenmix
    return {
        "pointwise_attention_fwd": (ops.pointwise_attention_fwd, (
            *(randn(2, 3, 11, 5) for _ in range(3)), mask, torch.full((1, 11), 0.5), "relu2", 0.4, True)),
        "mixed_chunk_attention_fwd": (
            ops.mixed_chunk_attention_fwd, (*(randn(*bnd) for _ in range(5)), mask, 4, True)),
        "aft_simple_fwd": (ops.aft_simple_fwd, (*(randn(*bnd) for _ in range(3)), mask, True)),
        "aft_full_fwd": (ops.aft_full_fwd, (*(randn(*bnd) for _ in range(3)), randn(12, 12), mask, False)),
        "aft_local_fwd": (
            ops.aft_local_fwd, (*(randn(*bnd) for _ in range(3)), randn(11, 1, 5), mask, 3, False)),
        "aft_local_fwd_per_head": (
            ops.aft_local_fwd, (randn(*bnd), randn(2, 11, 2), randn(*bnd), randn(1, 2, 3), None, 2, True)),
        "depthwise_conv_fwd": (ops.depthwise_conv_fwd, (randn(*bnd), randn(2, 3), 2, True)),
        # The reference path's one custom op (AFT's exact recomputation under torch.compile), some
        # entries flagged.
        "aft_exact_underflowed_fwd": (ops.aft_exact_underflowed_fwd, (
            randn(*bnd), mask[..., None].expand(bnd).clone(), randn(*bnd), randn(*bnd), [randn(11, 11)],
            "table", 3, 0, True, 2)),
    }  # fmt: skip


def packed_opcheck_cases():
    """The forward ops on one packed row (B = 1) of segments 4, 0 and 7 long: their packed argument
    (bounds, or the convolution's per-position segment ids) is part of the schema and the fake kernel."""
    generator = torch.Generator().manual_seed(1)
    bounds = torch.tensor([0, 4, 4, 11])
    segments = torch.tensor([0] * 4 + [2] * 7, dtype=torch.int32)
    bnd = (1, 11, 6)

    def randn(*shape):
        return _randn(generator, *shape)

    ops = torch.ops.tokenmix
    return {
        "pointwise_attention_fwd_packed": (ops.pointwise_attention_fwd, (
            *(randn(1, 3, 11, 5) for _ in range(3)), None, torch.full((1, 11), 0.5), "relu2", 0.4, True,
            bounds)),
        "mixed_chunk_attention_fwd_packed": (
            ops.mixed_chunk_attention_fwd, (*(randn(*bnd) for _ in range(5)), None, 3, True, bounds)),
        "aft_simple_fwd_packed": (ops.aft_simple_fwd, (*(randn(*bnd) for _ in range(3)), None, True, bounds)),
        "aft_full_fwd_packed": (
            ops.aft_full_fwd, (*(randn(*bnd) for _ in range(3)), randn(7, 7), None, False, bounds)),
        "aft_local_fwd_packed": (
            ops.aft_local_fwd, (*(randn(*bnd) for _ in range(3)), randn(11, 1, 5), None, 3, False, bounds)),
        "depthwise_conv_fwd_packed": (ops.depthwise_conv_fwd, (randn(*bnd), randn(2, 3), 2, True, segments)),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(packed_opcheck_cases()))
def test_opcheck_packed(name):
    with tokenmix.use_backend("triton"):
        op, args = packed_opcheck_cases()[name]
        torch.library.opcheck(op, args)


OPCHECKED = ["pointwise_attention_fwd", "mixed_chunk_attention_fwd", "aft_simple_fwd", "aft_full_fwd",
             "aft_local_fwd", "aft_local_fwd_per_head", "depthwise_conv_fwd",
             "aft_exact_underflowed_fwd"]  # fmt: skip


@pytest.mark.parametrize("name", OPCHECKED)
def test_opcheck(name):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the forward op."""
    with tokenmix.use_backend("triton"):
        op, args = opcheck_cases()[name]
        torch.library.opcheck(op, args)


def test_every_registered_forward_op_is_opchecked():
    namespace = torch.ops.tokenmix
    registered = {
        name for name in dir(namespace) if isinstance(getattr(namespace, name), torch._ops.OpOverloadPacket)
    }
    forward = {name for name in registered if name.endswith("_fwd")}
    assert forward == {name for name in OPCHECKED if not name.endswith("_per_head")}
    assert registered == forward | {name.removesuffix("_fwd") + "_bwd" for name in forward}


def _kernel_modules():
    return [module for name, module in sorted(sys.modules.items()) if name.startswith("tokenmix.kernels.")]


def test_every_op_and_kernel_is_named_as_its_python_function_and_uniquely():
    """What a profiler, a compiled graph or a Triton cache shows is the Python name, and no two kernels
    share one (two ``_forward_kernel``s could not be told apart)."""
    ops, kernels = {}, {}
    for module in [*_kernel_modules(), _aft_exact]:
        for attribute, value in vars(module).items():
            if isinstance(value, torch._library.custom_ops.CustomOpDef):
                assert value._qualname == f"tokenmix::{attribute}", (module.__name__, attribute)
                ops.setdefault(attribute, set()).add(module.__name__)
            jitted = isinstance(value, triton.runtime.jit.KernelInterface)  # compiled or interpreted
            if jitted and value.fn.__module__ == module.__name__:
                assert value.__name__ == attribute
                if attribute.endswith("_kernel"):
                    kernels.setdefault(attribute, set()).add(module.__name__)
    assert len(ops) == 14 and all(len(where) == 1 for where in ops.values())
    assert all(not name.startswith("_") and len(where) == 1 for name, where in kernels.items()), kernels
    assert len(kernels) >= 15


def test_a_compiled_function_follows_a_change_of_backend():
    """The backend is read while tracing and guarded on: forcing triton afterwards recompiles (and
    raises for float64, which no kernel takes) instead of replaying the reference graph."""
    compiled = torch.compile(functional.aft_simple, backend="aot_eager", fullgraph=True)
    q = torch.randn(1, 5, 3, dtype=torch.float64)
    with tokenmix.use_backend("reference"):
        torch.testing.assert_close(compiled(q, q, q), functional.aft_simple(q, q, q))
    with tokenmix.use_backend("triton"), pytest.raises(Exception, match="float64 runs on the reference"):
        compiled(q, q, q)


@pytest.mark.parametrize("name", ["pointwise", "aft_full", "flash"])
def test_forced_triton_refuses_a_chunk_from_a_state(device, name):
    """A first chunk is the forward op (its kernel runs); a chunk continued from a state has no kernel:
    forced triton says so instead of falling back."""
    mixer = tokenmix.create_mixer(name, 16, causal=True, **({"chunk_size": 4} if name == "flash" else {}))
    mixer = mixer.to(device)
    x = torch.randn(2, 6, 16, device=device)
    with tokenmix.use_backend("triton"):
        state = mixer.init_state(2)
        _, state = mixer.step(x[:, :3], state)
        with pytest.raises(RuntimeError, match="continued from a decoding state"):
            mixer.step(x[:, 3:], state)


@pytest.mark.parametrize("name", PACKED_KERNELS)
def test_compile_traces_a_packed_call_through_the_kernel_in_one_graph(name):
    """A packed row, planned once (as a model hands the plan to its layers), through torch.compile with
    fullgraph: the same outputs and gradients as eager, so nothing of the packing breaks the graph."""
    from tests.functional.test_varlen import case
    from tokenmix.core.packing import Packing

    generator = torch.Generator().manual_seed(PACKED_KERNELS.index(name))
    op, sequences, parameters = case(name, True, generator, 11)
    tensors = [t.float().requires_grad_() for t, _ in sequences] + [p.float() for p in parameters]
    packing = Packing.of(torch.tensor([0, 4, 4, 11]), tensors[0].device)

    def packed(*inputs):
        return op(*inputs, packing=packing)

    results, grad = [], None
    torch._dynamo.reset()  # one code object (``packed``) for every op: past 8, the recompile limit
    with tokenmix.use_backend("triton"):
        for run in (packed, torch.compile(packed, backend="aot_eager", fullgraph=True, dynamic=False)):
            out = run(*tensors)
            grad = torch.randn(out.shape, generator=generator) if grad is None else grad
            leaves = [t for t in tensors if t.requires_grad]
            results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)

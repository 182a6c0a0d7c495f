"""Under torch.use_deterministic_algorithms(True) no kernel with an atomic backward runs a backward:
forced triton raises naming the reason (as PyTorch does for its own such ops), auto takes the
reference path, and calls that need no gradient still run the kernel."""

from __future__ import annotations

import pytest
import torch

import tokenmix
from tokenmix import functional as F


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def calls(device, requires_grad):
    def t(*shape):
        return torch.randn(*shape, device=device).requires_grad_(requires_grad)

    return {
        "aft_simple": lambda: F.aft_simple(t(1, 9, 4), t(1, 9, 4), t(1, 9, 4), causal=True),
        "aft_full": lambda: F.aft_full(t(1, 9, 4), t(1, 9, 4), t(1, 9, 4), t(9, 9)),
        "aft_local": lambda: F.aft_local(t(1, 9, 4), t(1, 9, 4), t(1, 9, 4), t(9, 9), window=3),
        "aft_conv": lambda: F.aft_conv(t(1, 9, 2, 2), t(1, 9, 2), t(1, 9, 2, 2), t(2, 3)),
    }


@pytest.mark.parametrize("name", ["aft_simple", "aft_full", "aft_local", "aft_conv"])
def test_atomic_backwards_are_refused_in_deterministic_mode(device, deterministic, name):
    with tokenmix.use_backend("triton"), pytest.raises(RuntimeError, match="use_deterministic_algorithms"):
        calls(device, requires_grad=True)[name]()
    with tokenmix.use_backend("triton"):  # no gradient, no atomics: the kernel runs
        assert torch.isfinite(calls(device, requires_grad=False)[name]()).all()
    out = calls(device, requires_grad=True)[name]()  # auto: the reference path, deterministic
    out.sum().backward()


def non_atomic_calls(device, requires_grad, made=None):
    """The kernels whose backward adds without atomics (each gradient entry written by one program);
    ``made`` collects the inputs each call creates."""

    def t(*shape):
        tensor = torch.randn(*shape, device=device).requires_grad_(requires_grad)
        if made is not None:
            made.append(tensor)
        return tensor

    return {
        "pointwise_attention": lambda: F.pointwise_attention(t(1, 2, 9, 4), t(1, 2, 9, 4), t(1, 2, 9, 4)),
        "mixed_chunk_attention": lambda: F.mixed_chunk_attention(
            *(t(1, 9, 4) for _ in range(5)), chunk_size=4, causal=True
        ),
        "lightconv": lambda: F.lightconv(t(1, 9, 4), t(2, 3), causal=True),
        "dynamic_conv": lambda: F.dynamic_conv(t(1, 9, 4), t(1, 9, 2, 3), causal=True),
    }


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize(
    "name", ["aft_simple", "aft_full", "aft_local", "aft_conv", "pointwise_attention", "lightconv"]
)
def test_auto_as_on_a_gpu_takes_a_kernel_unless_its_backward_needs_atomics(
    device, deterministic, monkeypatch, name, grad
):
    """What ``auto`` chooses on a GPU in deterministic mode, counted in kernel calls: an atomic backward
    (AFT's, when a gradient is needed) goes to the reference path; every other call runs its kernel."""
    from tests.kernels.test_varlen import kernel_launches

    monkeypatch.setattr(tokenmix.backend, "auto_takes_kernels", lambda tensor: True)
    launched = kernel_launches(monkeypatch)
    out = {**calls(device, grad), **non_atomic_calls(device, grad)}[name]()
    assert (len(launched) == 0) == (name.startswith("aft") and grad), launched
    if grad:
        out.sum().backward()


@pytest.mark.parametrize(
    "name", ["pointwise_attention", "mixed_chunk_attention", "lightconv", "dynamic_conv"]
)
def test_forced_kernels_without_atomics_repeat_bit_for_bit(device, deterministic, name):
    """Deterministic mode lets the kernels without atomics run their backward: two runs on the same
    inputs give the same outputs and gradients, bit for bit."""
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        made = []
        with tokenmix.use_backend("triton"):
            out = non_atomic_calls(device, True, made)[name]()
            grads = torch.autograd.grad(out, made, torch.ones_like(out))
        results.append((out.detach(), grads))
    (first, first_grads), (second, second_grads) = results
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads, strict=True))

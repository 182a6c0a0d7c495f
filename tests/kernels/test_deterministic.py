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

from __future__ import annotations

import pytest
import torch

import tokenmix
from tokenmix.backend import get_backend, use_backend


def test_the_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.delenv("TOKENMIX_BACKEND", raising=False)
    assert get_backend() == "auto"
    with use_backend("reference"):
        assert get_backend() == "reference"
        with tokenmix.use_backend("triton"):
            assert get_backend() == "triton"
        assert get_backend() == "reference"
    assert get_backend() == "auto"


def test_the_environment_variable_chooses_and_is_checked(monkeypatch):
    monkeypatch.setenv("TOKENMIX_BACKEND", "reference")
    assert get_backend() == "reference"
    with use_backend("auto"):
        assert get_backend() == "auto"  # the context manager wins
    monkeypatch.setenv("TOKENMIX_BACKEND", "cuda")
    with pytest.raises(ValueError, match="TOKENMIX_BACKEND must be one of auto, reference, triton"):
        get_backend()
    with pytest.raises(ValueError, match="backend must be one of"), use_backend("fast"):
        pass


class _Fake:
    """Just what use_kernel reads of a tensor: its device type and dtype."""

    def __init__(self, device_type: str, dtype: torch.dtype = torch.float32) -> None:
        self.device = type("Device", (), {"type": device_type})()
        self.dtype = dtype


def test_auto_picks_a_kernel_for_cuda_tensors_only_where_one_covers_the_call(monkeypatch):
    from tokenmix.backend import use_kernel

    monkeypatch.delenv("TOKENMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_kernel("op", _Fake("cuda"))
    assert not use_kernel("op", _Fake("cuda"), unsupported="no kernel for this option")
    assert not use_kernel("op", _Fake("cuda", torch.float64))  # no kernel takes float64
    assert not use_kernel("op", _Fake("cpu"))  # auto never interprets CPU tensors
    with use_backend("reference"):
        assert not use_kernel("op", _Fake("cuda"))
    with use_backend("triton"):
        assert use_kernel("op", _Fake("cpu"))  # forced, and the interpreter is on
    monkeypatch.setattr("tokenmix.backend.triton_installed", lambda: False)
    assert not use_kernel("op", _Fake("cuda"))
    with use_backend("triton"), pytest.raises(RuntimeError, match="Triton is not installed"):
        use_kernel("op", _Fake("cuda"))

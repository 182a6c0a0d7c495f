from __future__ import annotations

import pytest

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

from __future__ import annotations

import pytest
from torch import nn

import tokenmix
from tokenmix.mixers import registry


def test_listed_mixers_include_the_foundation():
    assert {"softmax", "pointwise"} <= set(tokenmix.list_mixers())


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"known mixers: .*softmax"):
        tokenmix.create_mixer("linformer", 16)


def test_options_and_defaults_come_from_the_signature(monkeypatch):
    monkeypatch.setattr(registry, "_MIXERS", {})

    @registry.register_mixer("toy", paper="p", time="t", memory="m", state="s")
    class Toy(nn.Module):
        def __init__(self, dim, *, causal=False, width=3, name="x"):
            super().__init__()
            self.dim, self.causal, self.width = dim, causal, width

    assert tokenmix.mixer_info("toy").options == {"width": 3, "name": "x"}
    toy = tokenmix.create_mixer("toy", 8, causal=True, width=5)
    assert (toy.dim, toy.causal, toy.width) == (8, True, 5)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_mixer("toy", paper="p", time="t", memory="m", state="s")(Toy)

"""Named language-model configurations: ``create_model(name, vocab_size, **overrides)``.

FLASH-Quad and FLASH are stacks of GAU layers with no FFN, two GAU layers per Transformer layer (the
paper's accounting: a GAU layer has about half the parameters of an attention + FFN layer). GAU carries
its own RoPE, so those stacks add no absolute positions. ``*-small`` fit a CPU; ``*-base`` are the paper's
layer shapes at base size (d = 768, e = 2d, s = 128, C = 256) for a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidValueError
from ..mixers import model_options
from .language_model import LanguageModel


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)


def _gau_stack(mixer: str, dim: int, transformer_layers: int, **mixer_options: Any) -> dict[str, Any]:
    return model_options(mixer, dim, transformer_layers, **mixer_options)  # the registered GAU recipe


_PRESETS = {
    preset.name: preset
    for preset in (
        Preset(
            "transformer-small",
            "softmax attention + FFN, 4 layers, d=256 (CPU baseline)",
            {"dim": 256, "depth": 4, "mixer": "softmax", "positions": "rope", "mixer_options": {"heads": 4}},
        ),
        Preset(
            "flash-quad-small",
            "FLASH-Quad: 8 GAU layers (≈ 4 Transformer layers), d=256",
            _gau_stack("gau", 256, 4),
        ),
        Preset(
            "flash-small",
            "FLASH: 8 GAU layers with mixed-chunk attention, d=256, C=128",
            _gau_stack("flash", 256, 4, chunk_size=128),
        ),
        Preset(
            "transformer-base",
            "softmax attention + FFN, 12 layers, d=768, 12 heads (GPU baseline)",
            {
                "dim": 768,
                "depth": 12,
                "mixer": "softmax",
                "positions": "rope",
                "mixer_options": {"heads": 12},
            },
        ),
        Preset(
            "flash-quad-base",
            "FLASH-Quad: 24 GAU layers (≈ 12 Transformer layers), d=768",
            _gau_stack("gau", 768, 12),
        ),
        Preset(
            "flash-base",
            "FLASH: 24 GAU layers with mixed-chunk attention, d=768, C=256",
            _gau_stack("flash", 768, 12, chunk_size=256),
        ),
    )
}


def list_presets() -> list[Preset]:
    return list(_PRESETS.values())


def create_model(name: str, vocab_size: int = 256, **overrides: Any) -> LanguageModel:
    """The language model of preset ``name``; ``overrides`` replace config entries (e.g. ``max_len``)."""
    if name not in _PRESETS:
        raise InvalidValueError(f"unknown preset {name!r}; known presets: {', '.join(_PRESETS)}")
    return LanguageModel(vocab_size, **{**_PRESETS[name].config, **overrides})

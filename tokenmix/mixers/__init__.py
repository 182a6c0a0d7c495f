"""Mixer modules. Importing a family file registers its mixers."""

from . import aft, attention, conv, flash, identity  # noqa: F401  (each family registers its mixers)
from .base import Mixer
from .registry import (
    MixerInfo,
    ModelDefaults,
    create_mixer,
    list_mixers,
    mixer_info,
    model_options,
    register_mixer,
)

__all__ = [
    "Mixer",
    "MixerInfo",
    "ModelDefaults",
    "create_mixer",
    "list_mixers",
    "mixer_info",
    "model_options",
    "register_mixer",
]

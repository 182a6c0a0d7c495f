"""Mixer modules. Importing a family file registers its mixers."""

from . import aft, attention, conv, flash  # noqa: F401  (each family registers its mixers)
from .base import Mixer
from .registry import MixerInfo, create_mixer, list_mixers, mixer_info, register_mixer

__all__ = ["Mixer", "MixerInfo", "create_mixer", "list_mixers", "mixer_info", "register_mixer"]

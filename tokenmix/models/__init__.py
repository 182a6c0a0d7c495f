"""Models that take any registered mixer by name."""

from .backbone import Backbone, BackboneState, Block, FeedForward
from .language_model import LanguageModel, SequenceClassifier
from .presets import Preset, create_model, list_presets
from .vision import VisionTransformer

__all__ = [
    "Backbone",
    "BackboneState",
    "Block",
    "FeedForward",
    "LanguageModel",
    "Preset",
    "SequenceClassifier",
    "VisionTransformer",
    "create_model",
    "list_presets",
]

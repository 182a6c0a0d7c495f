"""Models that take any registered mixer by name."""

from .backbone import Backbone, BackboneState, Block, FeedForward
from .language_model import LanguageModel, SequenceClassifier
from .vision import VisionTransformer

__all__ = [
    "Backbone",
    "BackboneState",
    "Block",
    "FeedForward",
    "LanguageModel",
    "SequenceClassifier",
    "VisionTransformer",
]

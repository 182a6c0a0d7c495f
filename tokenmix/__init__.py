"""tokenmix: Transformer token mixers — softmax attention and the mechanisms proposed to replace it."""

from . import functional
from .backend import get_backend, use_backend
from .mixers import create_mixer, list_mixers, mixer_info
from .training import TrainConfig, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "TrainConfig",
    "__version__",
    "create_mixer",
    "evaluate",
    "functional",
    "get_backend",
    "list_mixers",
    "mixer_info",
    "train",
    "use_backend",
]

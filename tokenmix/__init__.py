"""tokenmix: Transformer token mixers — softmax attention and the mechanisms proposed to replace it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import functional
from .backend import get_backend, use_backend
from .mixers import create_mixer, list_mixers, mixer_info

if TYPE_CHECKING:
    from .training import TrainConfig, evaluate, train

__version__ = "0.1.0"

# Imported when first used: training pulls in torch.distributed's checkpointing (seconds of import),
# which a user of the mixers alone never needs.
_FROM_TRAINING = ("TrainConfig", "evaluate", "train")
_SUBPACKAGES = ("bench", "cli", "data", "hf", "kernels", "models", "timm", "training")


def __getattr__(name: str) -> Any:
    if name in _FROM_TRAINING:
        value = getattr(importlib.import_module(".training", __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'tokenmix' has no attribute {name!r}")
    globals()[name] = value
    return value


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

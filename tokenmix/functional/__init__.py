"""The math of every mixer: tensors in, tensors out, no parameters (like ``torch.nn.functional``)."""

from ..core.packing import Packing
from .aft import (
    AFTSimpleState,
    AFTWindowState,
    aft_accumulate,
    aft_cached,
    aft_conv,
    aft_full,
    aft_full_cached,
    aft_local,
    aft_local_lowrank,
    aft_simple,
)
from .attention import (
    ACTIVATIONS,
    pointwise_attention,
    pointwise_attention_cached,
    pointwise_attention_step,
    softmax_attention,
    softmax_attention_cached,
    softmax_attention_step,
)
from .conv import ConvWindowState, dynamic_conv, lightconv
from .flash import MixedChunkState, mixed_chunk_attention

__all__ = [
    "ACTIVATIONS",
    "AFTSimpleState",
    "AFTWindowState",
    "ConvWindowState",
    "MixedChunkState",
    "Packing",
    "aft_accumulate",
    "aft_cached",
    "aft_conv",
    "aft_full",
    "aft_full_cached",
    "aft_local",
    "aft_local_lowrank",
    "aft_simple",
    "dynamic_conv",
    "lightconv",
    "mixed_chunk_attention",
    "pointwise_attention",
    "pointwise_attention_cached",
    "pointwise_attention_step",
    "softmax_attention",
    "softmax_attention_cached",
    "softmax_attention_step",
]

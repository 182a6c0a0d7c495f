"""Vision Transformer (Dosovitskiy et al. 2021) with any registered mixer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn

from ..core.checks import check_choice, check_positive_int
from ..errors import InvalidValueError
from ..init import SelfInitialising
from ..mixers import mixer_info
from .backbone import Backbone


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise InvalidValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    return check_positive_int(f"{name}[0]", pair[0]), check_positive_int(f"{name}[1]", pair[1])


class VisionTransformer(SelfInitialising):
    """Images (B, C, H, W) → logits (B, num_classes).

    Non-overlapping patches are embedded by a strided convolution, a class token is prepended
    (``pool="cls"``) or the patch states are averaged (``pool="mean"``), and the sequence goes through a
    bidirectional Backbone. Mixers with a ``grid`` option (AFT-conv) get the patch grid and run in 2-D,
    mean-pooled without a class token, as the AFT paper does. Backbone options (``mixer_options``,
    ``positions``, ...) are passed through; the learned position table is sized to the number of patches.

    timm's ``VisionTransformer`` arguments and these: ``img_size`` → ``image_size``, ``patch_size``,
    ``num_classes``, ``in_chans`` → ``in_channels``, ``embed_dim`` → ``dim``, ``depth``, ``num_heads`` →
    ``mixer_options={"heads": ...}``, ``global_pool="token"`` / ``"avg"`` → ``pool="cls"`` / ``"mean"``
    (``class_token`` follows ``pool``). To run a mixer inside timm's own ViT instead, see ``tokenmix.timm``.
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        patch_size: int | Sequence[int],
        num_classes: int,
        *,
        in_channels: int = 3,
        dim: int = 192,
        depth: int = 6,
        mixer: str | Sequence[str] = "softmax",
        pool: str = "cls",
        **backbone_options: Any,
    ) -> None:
        super().__init__()
        self.image_size, self.patch_size = _pair("image_size", image_size), _pair("patch_size", patch_size)
        for axis, (size, patch) in enumerate(zip(self.image_size, self.patch_size, strict=True)):
            if size % patch:
                raise InvalidValueError(f"patch_size {patch} must divide image_size {size} (axis {axis})")
        self.grid = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.pool = check_choice("pool", pool, ("cls", "mean"))
        names = [mixer] * depth if isinstance(mixer, str) else list(mixer)
        on_grid = [index for index, name in enumerate(names) if "grid" in mixer_info(name).options]
        if on_grid:
            # Each layer whose mixer works on the 2-D patch grid (AFT-conv) gets it; a class token has no
            # place there.
            if pool == "cls":
                raise InvalidValueError(
                    f"mixer {names[on_grid[0]]!r} works on the patch grid: use pool='mean' (no class token)"
                )
            layers = list(backbone_options.pop("layer_options", None) or [{}] * len(names))
            if len(layers) != len(names):
                raise InvalidValueError(
                    f"layer_options has {len(layers)} entries but there are {len(names)} layers"
                )
            for index in on_grid:
                layers[index] = {"grid": self.grid, **(layers[index] or {})}
            backbone_options["layer_options"] = layers
        seq_len = self.grid[0] * self.grid[1] + (pool == "cls")
        backbone_options.setdefault("max_len", seq_len)
        self.patch_embedding = nn.Conv2d(in_channels, dim, self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim)) if pool == "cls" else None
        self.no_weight_decay = frozenset({"cls_token"})  # a learned input, not a projection
        self.backbone = Backbone(dim, depth, mixer, causal=False, **backbone_options)
        self.head = nn.Linear(dim, check_positive_int("num_classes", num_classes))

    def init_own(self) -> None:
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, *self.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InvalidValueError(
                f"images must have shape (B, {', '.join(map(str, expected))}), got {shape}"
            )
        patches = rearrange(self.patch_embedding(images), "b d h w -> b (h w) d")
        if self.cls_token is not None:
            patches = torch.cat((self.cls_token.expand(len(patches), -1, -1), patches), dim=1)
        hidden = self.backbone(patches)
        return self.head(hidden[:, 0] if self.cls_token is not None else hidden.mean(1))

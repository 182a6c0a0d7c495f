"""tokenmix mixers inside timm's models (the ``tokenmix[timm]`` extra).

``attn_layer(mixer, **options)`` returns an attention class with timm's constructor and
``forward(x, attn_mask=None, is_causal=False)``, for any timm model that takes ``attn_layer``::

    import timm, tokenmix.timm
    model = timm.create_model("vit_tiny_patch16_224", attn_layer=tokenmix.timm.attn_layer("aft_conv"))
    tokenmix.timm.bind_grid(model)  # aft_conv reads the patch grid of each forward's images

How timm's arguments reach the mixer (docs/spec.md §10):

- ``num_heads`` → ``heads``, ``attn_head_dim`` → ``head_dim``, ``qkv_bias`` → ``bias``, where the mixer
  has that option (mixers without one keep their own projections); ``proj_bias`` sets the bias of the
  mixer's output projection ``to_out``, whatever the mixer; ``proj_drop`` is dropout on the output.
- ``qk_norm=True`` turns the mixer's ``qk_layernorm`` on with timm's ``norm_layer``; ``qk_norm=False``
  leaves the mixer's own default (pointwise attention keeps its paper's qk-layernorm).
- ``attn_drop``, ``scale_norm``, ``gated`` and ``dim_out ≠ dim`` have no counterpart in tokenmix's mixers
  and are refused when asked for.
- ``options`` are the mixer's registry options (``tokenmix list``) and win over the mapped ones.

A checkpoint of timm's own ``Attention`` loads with ``strict=True`` into the ``"softmax"`` and
``"pointwise"`` layers: timm's names (``qkv``, ``proj``, ``q_norm``, ``k_norm``) are converted on load.

Mixers on a 2-D grid (``aft_conv``) get the patch grid: the last X·Y tokens are the patches in row-major
order and any tokens before them (timm's class and register tokens) are prefix tokens. The grid is the
model's own: ``bind_grid(model)`` reads it from ``model.patch_embed`` at each forward (any image size,
``dynamic_img_size`` included) with ``model.num_prefix_tokens``; or ``grid=(X, Y)`` fixes it. A layer
with neither refuses to guess (a 64 × 96 image's 4 × 6 patches and class token are 25 tokens, which a
guessed 5 × 5 grid would read as patches). A prefix token is not seen by the patches
(the AFT paper's AFT-conv has no class token); its output is the mean of the patches' outputs, so a
class token still reads the whole image. ``class_token=False, global_pool="avg"`` in ``create_model`` is
the paper's set-up.

``attn_mask``: None, or a boolean key-padding mask, (B, N) or SDPA's broadcastable (B, 1, 1, N), True =
real token. ``is_causal=True`` needs a mixer built with ``causal=True``.
"""

from __future__ import annotations

import ast
import base64
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .errors import InvalidTypeError, InvalidValueError
from .mixers import create_mixer, mixer_info
from .mixers.registry import check_options

__all__ = ["TimmAttention", "attn_layer", "bind_grid"]

# timm's names of the attention's parameters → tokenmix's (MultiHeadAttention's), for loading checkpoints
_TIMM_NAMES = {"qkv.": "mixer.to_qkv.", "proj.": "mixer.to_out.", "q_norm.": "mixer.q_norm.",
               "k_norm.": "mixer.k_norm."}  # fmt: skip


def _set_bias(linear: nn.Linear, wanted: bool) -> None:
    """Give ``linear`` a zero bias or take its bias away, so that it matches timm's ``proj_bias``."""
    if wanted and linear.bias is None:
        linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features))
    elif not wanted and linear.bias is not None:
        linear.register_parameter("bias", None)


class TimmAttention(nn.Module):
    """A tokenmix mixer behind timm's attention interface; ``attn_layer`` makes the subclass per mixer.

    Args:
        dim: token width, in and out.
        num_heads: the mixer's ``heads`` where it has that option (default 8).
        attn_head_dim: the mixer's ``head_dim`` (default None: dim // num_heads).
        dim_out: None or ``dim`` (tokenmix mixers map dim to dim).
        qkv_bias: the mixer's ``bias`` where it has that option (default False, timm's).
        qk_norm: turn the mixer's ``qk_layernorm`` on, normalised by ``norm_layer`` (default False).
        scale_norm, gated: not supported; must be False.
        proj_bias: bias of the output projection (default True).
        attn_drop: must be 0 (no mixer drops attention weights).
        proj_drop: dropout on the output (default 0).
        norm_layer: timm's norm constructor, used for qk-norm (default None: LayerNorm).
        device, dtype: where and in which dtype to build the parameters.
    """

    mixer_name: str = ""
    mixer_options: dict[str, Any] = {}  # noqa: RUF012 (read-only, set per subclass by attn_layer)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **unsupported: Any,
    ) -> None:
        super().__init__()
        if not self.mixer_name:
            raise InvalidTypeError(
                "TimmAttention is built through tokenmix.timm.attn_layer(mixer, **options)"
            )
        if unsupported:
            raise InvalidTypeError(
                f"{self.mixer_name!r} attention got timm argument(s) it does not take: "
                f"{', '.join(sorted(unsupported))}"
            )
        for name, value in (("scale_norm", scale_norm), ("gated", gated)):
            if value:
                raise InvalidValueError(
                    f"{name}=True has no tokenmix counterpart; build the model with {name}=False"
                )
        if attn_drop:
            raise InvalidValueError(
                f"attn_drop={attn_drop}: tokenmix mixers have no attention-weight dropout; "
                "use attn_drop_rate=0"
            )
        if dim_out is not None and dim_out != dim:
            raise InvalidValueError(
                f"dim_out must be None or dim={dim} (tokenmix mixers map dim to dim), got {dim_out}"
            )
        accepted = mixer_info(self.mixer_name).options
        options: dict[str, Any] = {}
        mapped = {"heads": num_heads, "head_dim": attn_head_dim, "bias": qkv_bias}
        options.update({key: value for key, value in mapped.items() if key in accepted})
        if attn_head_dim is not None and "head_dim" not in accepted:
            raise InvalidValueError(f"attn_head_dim: mixer {self.mixer_name!r} has no head_dim option")
        if qk_norm:
            if "qk_layernorm" not in accepted:
                raise InvalidValueError(f"qk_norm=True: mixer {self.mixer_name!r} has no qk-norm")
            options["qk_layernorm"] = True
        options.update(self.mixer_options)
        grid = options.get("grid")
        self.infer_grid = "grid" in accepted and grid is None
        self.bound: tuple[tuple[int, int], int] | None = None  # (grid, prefix tokens): bind_grid's
        if self.infer_grid:
            options["grid"] = (1, 1)  # the patch grid is the bound model's, at each call (module doc)
        with torch.device(device) if device is not None else nullcontext():
            self.mixer = create_mixer(self.mixer_name, dim, **options)
            if qk_norm and norm_layer is not None and options.get("qk_layernorm"):
                self.mixer.q_norm, self.mixer.k_norm = (
                    norm_layer(self.mixer.head_dim),
                    norm_layer(self.mixer.head_dim),
                )
            _set_bias(self.mixer.to_out, proj_bias)
        if dtype is not None:
            self.mixer.to(dtype)
        self.proj_drop = nn.Dropout(proj_drop)
        self._register_load_state_dict_pre_hook(self._from_timm_names)

    def _from_timm_names(self, state_dict, prefix, *args) -> None:
        """Rename a timm ``Attention`` checkpoint's entries (``qkv.weight``, …) to this module's."""
        own = set(self.state_dict())
        for key in [key for key in state_dict if key.startswith(prefix)]:
            local = key[len(prefix) :]
            for timm_name, ours in _TIMM_NAMES.items():
                renamed = ours + local[len(timm_name) :]
                if local.startswith(timm_name) and renamed in own and local not in own:
                    state_dict[prefix + renamed] = state_dict.pop(key)
                    break

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """(B, N, dim) → (B, N, dim); ``attn_mask`` a boolean key-padding mask (see the module doc)."""
        if bool(is_causal) != self.mixer.causal:
            raise InvalidValueError(
                f"is_causal={bool(is_causal)} but the {self.mixer_name!r} layer was built with "
                f"causal={self.mixer.causal}; pass causal={bool(is_causal)} to attn_layer"
            )
        mask = _key_padding(attn_mask, x)
        grid = getattr(self.mixer, "grid", None)
        if grid is None:
            return self.proj_drop(self.mixer(x, mask))
        return self.proj_drop(self._on_grid(x, mask))

    def _on_grid(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        tokens = x.shape[1]
        if self.infer_grid:
            if self.bound is None:
                raise InvalidValueError(
                    f"{self.mixer_name!r} in a timm model needs its patch grid: call tokenmix.timm."
                    f"bind_grid(model) after timm.create_model, or pass grid=(X, Y) to attn_layer"
                )
            self.mixer.grid, prefix = self.bound
            if tokens != prefix + self.mixer.grid[0] * self.mixer.grid[1]:
                raise InvalidValueError(
                    f"x has {tokens} tokens; the bound model's images give {prefix} prefix tokens and a "
                    f"{self.mixer.grid} patch grid"
                )
        patches = self.mixer.grid[0] * self.mixer.grid[1]
        prefix = tokens - patches
        if prefix < 0:
            raise InvalidValueError(
                f"x has {tokens} tokens, fewer than the grid {self.mixer.grid} holds ({patches} patches)"
            )
        patch_mask = None if mask is None else mask[:, prefix:]
        mixed = self.mixer(x[:, prefix:], patch_mask)
        if prefix == 0:
            return mixed
        if patch_mask is None:
            summary = mixed.mean(1, keepdim=True)
        else:  # the mean over real patches (a row with none gets 0)
            weights = patch_mask[..., None].to(mixed.dtype)
            summary = (mixed * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
        return torch.cat((summary.expand(-1, prefix, -1), mixed), 1)


class _GridRecorder:
    """A forward pre-hook on a timm model's ``patch_embed``: hands each forward's patch grid and prefix
    token count to the model's grid layers (a class, not a closure, so the model still pickles)."""

    def __init__(self, layers: list[TimmAttention], prefix: int) -> None:
        self.layers, self.prefix = layers, prefix

    def __call__(self, patch_embed: nn.Module, args: tuple) -> None:
        height, width = args[0].shape[-2:]
        if hasattr(patch_embed, "dynamic_feat_size"):  # the images' own grid (padded ones included)
            grid = tuple(patch_embed.dynamic_feat_size((height, width)))
        else:
            grid = tuple(patch_embed.grid_size)
        for layer in self.layers:
            layer.bound = (grid, self.prefix)


def bind_grid(model: nn.Module) -> nn.Module:
    """Give the grid layers (``aft_conv``) of a timm model the model's real patch grid at every forward:
    read from ``model.patch_embed`` for the images given, behind ``model.num_prefix_tokens`` class and
    register tokens. Returns ``model``.

    Args:
        model: a timm model with ``patch_embed`` and ``num_prefix_tokens`` (``VisionTransformer`` and
            its kin) built with ``attn_layer``.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(patch_embed, "grid_size"):
        raise InvalidTypeError(
            f"bind_grid needs a timm model whose patch_embed has a grid_size, got {type(model).__name__}"
        )
    layers = [m for m in model.modules() if isinstance(m, TimmAttention) and m.infer_grid]
    recorder = _GridRecorder(layers, int(getattr(model, "num_prefix_tokens", 0)))
    for hook in list(patch_embed._forward_pre_hooks.values()):
        if isinstance(hook, _GridRecorder):  # bound again: one recorder
            hook.layers, hook.prefix = recorder.layers, recorder.prefix
            return model
    patch_embed.register_forward_pre_hook(recorder)
    return model


def _key_padding(attn_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """timm's ``attn_mask`` as a (B, N) bool key-padding mask; anything else is refused."""
    if attn_mask is None:
        return None
    batch, tokens = x.shape[:2]
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
        raise InvalidTypeError(
            "attn_mask must be None or a bool key-padding mask (B, N) or (B, 1, 1, N), True = real token, "
            f"got {attn_mask.dtype if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__}"
        )
    mask = attn_mask
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if tuple(mask.shape) != (batch, tokens):
        raise InvalidValueError(
            f"attn_mask must be a key-padding mask (B, N) = {(batch, tokens)} or (B, 1, 1, N) "
            f"(tokenmix mixers take no per-query mask), got shape {tuple(attn_mask.shape)}"
        )
    return mask


def attn_layer(mixer: str, **options: Any) -> type[TimmAttention]:
    """A timm attention class running the registered ``mixer`` with ``options`` (see the module doc).

    Args:
        mixer: a registered mixer name (``tokenmix list``).
        **options: the mixer's options, e.g. ``causal=True``, ``kernel_size=5``, ``grid=(14, 14)``;
            they win over what timm's arguments map to.

    Returns:
        A subclass of ``TimmAttention``, to pass as ``attn_layer`` to timm's models.
    """
    check_options(mixer, options)
    spec = repr((mixer, sorted(options.items())))
    # The class is found again by name when a model that holds it is unpickled (timm keeps it in the
    # model's _model_args too): its qualified name encodes the mixer and options, and the module's
    # __getattr__ rebuilds it from there in a fresh process.
    qualname = f"{_TITLE}_{base64.urlsafe_b64encode(spec.encode()).decode().rstrip('=')}"
    if qualname not in _CLASSES:
        name = "".join(part.title() for part in mixer.split("_")) + "TimmAttention"
        attributes = {"mixer_name": mixer, "mixer_options": dict(options), "__module__": __name__}
        _CLASSES[qualname] = type(name, (TimmAttention,), {**attributes, "__qualname__": qualname})
    return _CLASSES[qualname]


_TITLE = "TimmAttention"
_CLASSES: dict[str, type[TimmAttention]] = {}


def __getattr__(name: str) -> Any:
    """``attn_layer``'s classes by their qualified names (see there), for pickle."""
    if name.startswith(f"{_TITLE}_"):
        code = name[len(_TITLE) + 1 :]
        try:
            mixer, items = ast.literal_eval(base64.urlsafe_b64decode(code + "=" * (-len(code) % 4)).decode())
        except (ValueError, SyntaxError, UnicodeDecodeError) as error:
            raise AttributeError(f"{name!r} names no attn_layer class ({error})") from None
        return attn_layer(mixer, **dict(items))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

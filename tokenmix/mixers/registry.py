"""The mixer registry: each family registers its modules with ``@register_mixer``; users call
``create_mixer(name, dim, causal=..., **options)`` (timm's ``create_model`` pattern)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import InvalidTypeError, InvalidValueError

__all__ = [
    "MixerInfo",
    "ModelDefaults",
    "check_options",
    "create_mixer",
    "list_mixers",
    "mixer_info",
    "model_options",
    "register_mixer",
]


@dataclass(frozen=True)
class ModelDefaults:
    """How a mixer sits in a model unless told otherwise (timm's ``default_cfg``): what ``compare`` and
    the presets build from, so that no caller tests mixer names."""

    head_width: int | None = None  # heads = max(1, dim // head_width) (a mixer with a ``heads`` option)
    layers_per_block: int = 1  # mixer layers per Transformer layer: 2 for GAU's (half the parameters)
    ffn: bool = True  # False for mixers gated themselves (GAU)
    positions: str | None = None  # the model's position scheme; None: the model's default


@dataclass(frozen=True)
class MixerInfo:
    """What ``tokenmix list`` shows about a registered mixer."""

    name: str
    cls: type[nn.Module]
    paper: str
    time: str  # cost of a full forward, N = sequence length, d = width
    memory: str  # activation memory of a full forward
    state: str  # what a decoding state holds and how it grows with t
    options: dict[str, Any] = field(default_factory=dict)  # option name -> default
    defaults: ModelDefaults = ModelDefaults()
    control: bool = False  # mixes nothing on purpose (``identity``): a comparison's baseline


_MIXERS: dict[str, MixerInfo] = {}


def register_mixer(
    name: str,
    *,
    paper: str,
    time: str,
    memory: str,
    state: str,
    defaults: ModelDefaults = ModelDefaults(),
    control: bool = False,
):
    """Class decorator registering a mixer under ``name``.

    The class must take ``(dim, *, causal=False, **options)`` with every option keyword-only and
    defaulted; the options and their defaults are read from that signature. ``defaults``: how the mixer
    sits in a model (``model_options``). ``control``: the mixer mixes nothing on purpose (the contract
    tests of mixing skip it; comparisons run it as their baseline).
    """

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MIXERS:
            raise InvalidValueError(
                f"a mixer named {name!r} is already registered ({_MIXERS[name].cls.__qualname__})"
            )
        params = inspect.signature(cls.__init__).parameters
        options = {
            p.name: p.default
            for p in params.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "causal"
        }
        _MIXERS[name] = MixerInfo(name, cls, paper, time, memory, state, options, defaults, control)
        cls.mixer_name = name
        return cls

    return decorate


def list_mixers() -> list[str]:
    """Names of every registered mixer, in registration order."""
    return list(_MIXERS)


def mixer_info(name: str) -> MixerInfo:
    """The registry entry of ``name``; ``ValueError`` listing the known names if there is none."""
    if name not in _MIXERS:
        raise InvalidValueError(f"unknown mixer {name!r}; known mixers: {', '.join(_MIXERS)}")
    return _MIXERS[name]


def model_options(name: str, dim: int, transformer_layers: int, **mixer_options: Any) -> dict[str, Any]:
    """The model options (``Backbone``'s, ``LanguageModel``'s) of a stack of ``name`` as wide as ``dim``
    and as deep as ``transformer_layers`` Transformer layers, by the mixer's registered ``defaults``;
    ``mixer_options`` on top."""
    info = check_options(name, mixer_options)
    defaults = info.defaults
    options = dict(mixer_options)
    if defaults.head_width is not None and "heads" in info.options:
        options.setdefault("heads", max(1, dim // defaults.head_width))
    config = {"dim": dim, "depth": defaults.layers_per_block * transformer_layers, "mixer": name,
              "ffn": defaults.ffn, "mixer_options": options}  # fmt: skip
    if defaults.positions is not None:
        config["positions"] = defaults.positions
    return config


def create_mixer(name: str, dim: int, *, causal: bool = False, **options: Any) -> nn.Module:
    """Build the mixer ``name`` of width ``dim``: a module mapping (B, N, dim) to (B, N, dim).

    Unknown options raise ``TypeError`` listing the accepted ones with their defaults.
    """
    info = check_options(name, options)
    return info.cls(dim, causal=causal, **options)


def check_options(name: str, options: dict[str, Any]) -> MixerInfo:
    """The registry entry of ``name``, after checking that it takes every one of ``options`` (and
    ``causal``); ``TypeError`` listing the accepted ones with their defaults."""
    info = mixer_info(name)
    unknown = sorted(set(options) - set(info.options) - {"causal"})
    if unknown:
        accepted = ", ".join(f"{key}={value!r}" for key, value in info.options.items())
        raise InvalidTypeError(
            f"mixer {name!r} got unknown option(s) {', '.join(unknown)}; accepted: {accepted}"
        )
    return info

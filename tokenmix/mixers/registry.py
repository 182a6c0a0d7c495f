"""The mixer registry: each family registers its modules with ``@register_mixer``; users call
``create_mixer(name, dim, causal=..., **options)`` (timm's ``create_model`` pattern)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import InvalidTypeError, InvalidValueError

__all__ = ["MixerInfo", "check_options", "create_mixer", "list_mixers", "mixer_info", "register_mixer"]


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


_MIXERS: dict[str, MixerInfo] = {}


def register_mixer(name: str, *, paper: str, time: str, memory: str, state: str):
    """Class decorator registering a mixer under ``name``.

    The class must take ``(dim, *, causal=False, **options)`` with every option keyword-only and
    defaulted; the options and their defaults are read from that signature.
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
        _MIXERS[name] = MixerInfo(name, cls, paper, time, memory, state, options)
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

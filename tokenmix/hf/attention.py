"""tokenmix's attention functions inside any transformers model (``AttentionInterface``).

``register_attention()`` registers, with ``AttentionInterface`` and (transformers' boolean SDPA masks)
``AttentionMaskInterface``:

- ``"tokenmix_pointwise"``: ``tokenmix.functional.pointwise_attention`` (Wortsman et al. 2023);
- ``"tokenmix_softmax"``: ``tokenmix.functional.softmax_attention``;
- ``"tokenmix_aft_simple"``: ``tokenmix.functional.aft_simple`` over the heads' channels (q, k, v of
  (B, H, N, D) read as (B, N, H·D); the model's ``scaling`` does not apply: AFT has no q·k).

Then ``LlamaConfig(..., attn_implementation="tokenmix_pointwise")`` (or ``model.set_attn_implementation``)
runs the model's attention through tokenmix, causal or bidirectional as the model's layer says, with
padding, grouped-query attention (key/value heads repeated) and the KV cache (the newest queries over the
cached keys, as ``pointwise_attention_cached``). Options come from the model's config, saved with it::

    config.tokenmix_attention = {"activation": "relu", "alpha": 1.0, "length": None, "qk_norm": False}

``activation``, ``alpha`` and ``length`` are pointwise attention's (docs/spec.md §2); ``qk_norm``
(pointwise and softmax) divides each head's q and k by their root mean square, without parameters: a
rotation keeps the norm, so it commutes with the model's RoPE (the paper's qk-layernorm has learned
parameters, which an attention function cannot own; models that have them, such as Qwen3, keep their
own). Running it records ``config.attn_implementation``, so ``save_pretrained`` writes the name and
``from_pretrained`` (after ``import tokenmix.hf``) restores it. Two cases it cannot see: a model saved
before its first forward records nothing (pass ``attn_implementation`` to ``from_pretrained``), and a
model switched to another implementation after running tokenmix's keeps the tokenmix name (delete
``config.attn_implementation`` before saving, or pass ``attn_implementation`` when loading).

Masks other than causal or bidirectional with padding (sliding windows, chunked attention, packed
sequences, cross-attention) are refused, as is attention dropout.

Not registered, because they are not functions of q, k and v: AFT-full and AFT-local (learned position
biases w), AFT-conv (a learned kernel), GAU and FLASH (layers with their own projections and gate), and
the convolutions (no queries or keys).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import functional as F
from ..errors import InvalidTypeError, InvalidValueError, UnavailableError
from ..functional.attention import _cached_allowed, _check_pointwise_options

__all__ = ["ATTENTION_FUNCTIONS", "register_attention"]

_POINTWISE_OPTIONS = {"activation": "relu", "alpha": 1.0, "length": None}


def _options(module: torch.nn.Module, implementation: str) -> dict[str, Any]:
    """The config's ``tokenmix_attention`` options for ``implementation``, checked."""
    given = getattr(getattr(module, "config", None), "tokenmix_attention", None) or {}
    if not isinstance(given, dict):
        raise InvalidTypeError(f"config.tokenmix_attention must be a dict, got {type(given).__name__}")
    accepted = {"qk_norm": False}
    if implementation == "tokenmix_pointwise":
        accepted.update(_POINTWISE_OPTIONS)
    elif implementation == "tokenmix_aft_simple":
        accepted = {}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise InvalidTypeError(
            f"config.tokenmix_attention has option(s) {', '.join(unknown)} that {implementation} does not "
            f"take; accepted: {', '.join(f'{k}={v!r}' for k, v in accepted.items()) or 'none'}"
        )
    options = {**accepted, **given}
    if implementation == "tokenmix_pointwise":
        checked = _check_pointwise_options(options["activation"], options["alpha"], options["length"])
        options.update(zip(("activation", "alpha", "length"), checked, strict=True))
    return options


def _rms_normalised(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _key_pattern(
    mask: torch.Tensor | None, queries: int, keys: int, causal: bool
) -> tuple[int, torch.Tensor | None]:
    """Read transformers' mask as tokenmix's arguments: how many keys are in use and which are real.

    ``mask``: None (SDPA's "no mask": causal over the first ``queries`` keys, or every key) or a bool
    (B, 1, Q, K), True = attend. Returns (used keys, key padding (B, used) or None). The keys beyond the
    last one any query sees (an empty static cache) are dropped; the rest must be the causal pattern
    aligned to the end (or, bidirectional, the same keys for every query) and padding, else refused."""
    if mask is None:
        if causal and 1 < queries < keys:  # a static cache's prefill: SDPA's upper-left causal
            return queries, None
        return keys, None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        raise InvalidTypeError(
            "tokenmix attention takes transformers' boolean SDPA mask (B, 1, Q, K); got "
            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}"
        )
    seen = mask[:, 0].any(1).any(0)  # (K,): keys some query sees
    used = max(queries, int(seen.nonzero().max()) + 1 if bool(seen.any()) else 0)
    pattern = mask[:, 0, :, :used]
    key_mask = pattern[:, -1]  # the last query sees every real key up to its own position
    if causal:
        expected = _cached_allowed(queries, used, key_mask, mask.device)[:, 0]
    else:
        expected = key_mask[:, None, :].expand_as(pattern)
    if not torch.equal(pattern, expected):
        kind = "causal" if causal else "bidirectional"
        raise UnavailableError(
            f"tokenmix attention takes {kind} masks with padding; this mask is another pattern (a sliding "
            "window, chunked attention or packed sequences?): use attn_implementation='sdpa' for it"
        )
    return used, None if bool(key_mask.all()) else key_mask


def _prepare(module, query, key, value, dropout, kwargs) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Checks shared by every function; returns key and value with one head per query head."""
    if dropout:
        raise InvalidValueError(
            f"attention dropout {dropout}: tokenmix attention has none; set the config's attention_dropout=0"
        )
    if kwargs.get("softcap") is not None:
        raise InvalidValueError("softcap: tokenmix attention has no logit soft-capping")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: key/value head h // groups serves query head h
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    causal = kwargs.get("is_causal")
    return key, value, bool(getattr(module, "is_causal", True) if causal is None else causal)


def _remember(module: torch.nn.Module, implementation: str) -> None:
    """Write the implementation into the model's config as ``attn_implementation``, a key transformers'
    ``from_pretrained`` reads from config.json but ``save_pretrained`` does not write by itself: a saved
    model then loads running tokenmix attention again (with ``tokenmix.hf`` imported; without it,
    transformers refuses the unknown name) instead of SDPA with its options ignored."""
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "attn_implementation", None) != implementation:
        config.attn_implementation = implementation


def _attention(implementation: str) -> Callable:
    """The transformers attention function for ``implementation`` ('tokenmix_<op>')."""

    def attend(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """query (B, H, Q, D), key and value (B, H_kv, K, D) → ((B, Q, H, D), no weights)."""
        _remember(module, implementation)
        key, value, causal = _prepare(module, query, key, value, dropout, kwargs)
        queries, keys = query.shape[2], key.shape[2]
        used, key_mask = _key_pattern(attention_mask, queries, keys, causal)
        if not causal and queries != used:
            raise UnavailableError(
                f"tokenmix attention is self-attention: {queries} queries over {used} keys (cross-attention?)"
            )
        key, value = key[:, :, :used], value[:, :, :used]
        options = _options(module, implementation)
        if options.pop("qk_norm", False):
            query, key = _rms_normalised(query), _rms_normalised(key)
        out = _OPS[implementation](query, key, value, causal, key_mask, scaling, options)
        return out.transpose(1, 2).contiguous(), None

    attend.__name__ = attend.__qualname__ = implementation
    return attend


def _pointwise(q, k, v, causal, key_mask, scale, options):
    if q.shape[2] == k.shape[2]:
        return F.pointwise_attention(q, k, v, causal=causal, attention_mask=key_mask, scale=scale, **options)
    return F.pointwise_attention_cached(q, k, v, key_mask=key_mask, scale=scale, **options)


def _softmax(q, k, v, causal, key_mask, scale, options):
    if q.shape[2] == k.shape[2]:
        return F.softmax_attention(q, k, v, causal=causal, attention_mask=key_mask, scale=scale)
    return F.softmax_attention_cached(q, k, v, key_mask=key_mask, scale=scale)


def _aft_simple(q, k, v, causal, key_mask, scale, options):
    heads = q.shape[1]
    q, k, v = (t.transpose(1, 2).flatten(2) for t in (q, k, v))  # (B, N, H·D): AFT works per channel
    if q.shape[1] == k.shape[1]:
        out = F.aft_simple(q, k, v, causal=causal, attention_mask=key_mask)
    else:
        out = F.aft_full_cached(q, k, v, None, key_mask=key_mask).to(q.dtype)
    return out.unflatten(2, (heads, -1)).transpose(1, 2)


_OPS = {"tokenmix_pointwise": _pointwise, "tokenmix_softmax": _softmax, "tokenmix_aft_simple": _aft_simple}
ATTENTION_FUNCTIONS: dict[str, Callable] = {name: _attention(name) for name in _OPS}


def register_attention() -> tuple[str, ...]:
    """Register tokenmix's attention functions with transformers (see the module doc); idempotent.

    Returns:
        The registered names, each usable as ``attn_implementation``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, function in ATTENTION_FUNCTIONS.items():
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)
    return tuple(ATTENTION_FUNCTIONS)

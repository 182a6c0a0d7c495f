"""Softmax attention (the baseline) and pointwise attention (Wortsman et al. 2023; GAU's relu²).

Both ops take q, k: (B, H, N, Dk) and v: (B, H, N, Dv) and return (B, H, N, Dv). ``attention_mask`` is
(B, N) with True/1 = real token. See docs/spec.md §1–2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backend import use_kernel
from ..core.checks import (
    check_attention_mask,
    check_choice,
    check_dims,
    check_flag,
    check_float_tensor,
    check_positive_int,
    check_real,
    check_same_dtype_device,
    compute_dtype,
    empty_output,
)
from ..core.chunks import causal_aligned
from ..core.excluded import causal_finite, finite_at_padding, real_only, reinstate
from ..core.packing import Packing, packable
from ._deprecated import deprecated_alias

__all__ = [
    "ACTIVATIONS",
    "pointwise_attention",
    "pointwise_attention_cached",
    "softmax_attention",
    "softmax_attention_cached",
]

_QKV = "(B, H, N, D)"


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, int]:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, tensor, _QKV)
    check_same_dtype_device(q=q, k=k, v=v)
    return check_dims({}, q=(q, "BHNK"), k=(k, "BHNK"), v=(v, "BHNV"))


def _select_excluded(q, k, v, key_mask, causal: bool, packing: Packing | None = None):
    """Padded keys and values selected away, padded queries kept finite; when causal, finite keys and
    values (future ones meet 0s in products) and ``seen``: the outputs whose own terms are not (docs/spec.md
    §0), within each segment of a packed row. Returns q, k, v and seen (None when not causal)."""
    q, k, v = finite_at_padding(q, key_mask, 2), real_only(k, key_mask, 2), real_only(v, key_mask, 2)
    if not causal:
        return q, k, v, None
    starts = None if packing is None else packing.starts()
    k, v, seen = causal_finite(k, v, 2, key_channels=False, starts=starts)
    return q, k, v, seen


def _default_scale(scale: float | None, head_dim: int) -> float:
    scale = check_real("scale", scale, allow_none=True)
    return head_dim**-0.5 if scale is None else scale


# --------------------------------------------------------------------------------------------------
# Softmax attention
# --------------------------------------------------------------------------------------------------


@packable(q=2, k=2, v=2)
def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention, ``out = softmax(scale · q kᵀ + mask) v``, through PyTorch SDPA.

    Args:
        q, k: (B, H, N, Dk). v: (B, H, N, Dv).
        causal: position i sees keys j ≤ i.
        attention_mask: (B, N), True/1 = real token; padded keys get zero weight. Rows of padded queries
            are unspecified but finite (they are allowed every key, so no row is ever empty).
        scale: defaults to Dk^-1/2.
        cu_seqlens: (S + 1,) int64 cumulative segment lengths, batch size 1 (default None): the S
            segments of N are independent sequences, each as if called alone (docs/spec.md §8).
        packing: the plan of a cu_seqlens, ``Packing.of(cu_seqlens)`` (default None): for a model that
            calls many ops on one packed row and plans it once. Give cu_seqlens or packing, not both.

    Returns:
        (B, H, N, Dv), in the dtype of the inputs.
    """
    sizes = _check_qkv(q, k, v)
    causal = check_flag("causal", causal)
    batch, seq_len = sizes["B"], sizes["N"]
    scale = _default_scale(scale, sizes["K"])
    key_mask = check_attention_mask(attention_mask, batch, seq_len, q.device)
    if q.numel() == 0 or v.numel() == 0:
        return empty_output(v.shape, q, k, v)
    q, k, v, seen = _select_excluded(q, k, v, key_mask, causal)
    if key_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        return out if seen is None else reinstate(out, seen)
    allowed = key_mask[:, None, None, :]  # (B, 1, 1, N): keys
    if causal:
        allowed = allowed & torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    # A padded query may see no real key (left padding, causal): give it every key instead of a 0/0 row.
    allowed = allowed | ~key_mask[:, None, :, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return out if seen is None else reinstate(out, seen)


_FROM_STATE = "a chunk continued from a decoding state runs on the reference path"


def _cached_allowed(
    queries: int, keys: int, key_mask: torch.Tensor | None, device, causal: bool = True
) -> torch.Tensor:
    """(B or 1, 1, T, L): query i (the (L − T + i)-th position) sees key j ≤ L − T + i (every key unless
    ``causal``) that is real."""
    if causal:
        allowed = causal_aligned(queries, keys, device)
    else:
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=device)
    if key_mask is None:
        return allowed[None, None]
    return allowed[None, None] & key_mask[:, None, None, :]


def softmax_attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Causal attention continued from a KV cache: the newest T queries q (B, H, T, Dk) over the keys
    k (B, H, L, Dk), v (B, H, L, Dv) of every position so far, L ≥ T, the last T being the queries' own
    (causal offsets aligned to the end). ``key_mask`` (B, L): True = real key. Equals the last T rows of
    ``softmax_attention(..., causal=True)`` over the L positions. ``causal=False``: every query sees every
    real key (a context-parallel rank's queries over the whole sequence's keys; default True)."""
    scale = _default_scale(scale, q.shape[-1])
    if key_mask is None and (q.shape[-2] == 1 or not check_flag("causal", causal)):  # every key: no mask
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    allowed = _cached_allowed(q.shape[-2], k.shape[-2], key_mask, q.device, causal)
    if key_mask is not None:
        v = real_only(v, key_mask, 2)
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # a padded query with no real key: any row
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


# --------------------------------------------------------------------------------------------------
# Pointwise attention
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """A pointwise φ: ``forward`` (out of place), ``forward_`` (in place on the scores, which the blocked
    forward discards anyway), and ``backward(scores, weights, grad)`` → grad · φ'(scores). When
    ``needs_scores`` is False, φ' can be read from the weights alone and backward gets ``scores=None``,
    so the backward pass can overwrite the scores with the weights."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    forward_: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor], torch.Tensor]
    needs_scores: bool


def _relu2_backward(scores: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.mul_(scores.clamp_min(0)).mul_(2)


_aten = torch.ops.aten
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(torch.relu, torch.relu_, lambda s, a, g: _aten.threshold_backward(g, a, 0), False),
    "relu2": Activation(
        lambda s: torch.relu(s).square(), lambda s: s.relu_().square_(), _relu2_backward, True
    ),
    "gelu": Activation(F.gelu, F.gelu, lambda s, a, g: _aten.gelu_backward(g, s), True),  # exact (erf) GELU
    "softplus": Activation(
        F.softplus, F.softplus, lambda s, a, g: _aten.softplus_backward(g, s, 1, 20), True
    ),
    "identity": Activation(lambda s: s, lambda s: s, lambda s, a, g: g, False),
    "relu6": Activation(
        F.relu6,
        lambda s: F.relu6(s, inplace=True),
        lambda s, a, g: _aten.hardtanh_backward(g, a, 0.0, 6.0),
        False,
    ),
    "sigmoid": Activation(torch.sigmoid, torch.sigmoid_, lambda s, a, g: _aten.sigmoid_backward(g, a), False),
}

# A score tile is (group of batch·heads, rows, N). Tall tiles of one head beat many heads of few rows on
# the CPU (each matmul gets a tall operand); heads are grouped only while the tile stays small (short
# sequences). Causal tiles have fewer rows so that little of the skipped upper triangle is computed.
_BLOCK_ROWS = 512
_CAUSAL_BLOCK_ROWS = 128
_TILE_ELEMENTS = 1 << 19


def _tiles(batch_heads: int, seq_len: int, causal: bool):
    """Yield (slice of batch·heads, first row, end row) covering every (head, row) once."""
    rows = min(seq_len, _CAUSAL_BLOCK_ROWS if causal else _BLOCK_ROWS)
    group = max(1, _TILE_ELEMENTS // (rows * seq_len))
    for first in range(0, batch_heads, group):
        heads = slice(first, min(batch_heads, first + group))
        for start in range(0, seq_len, rows):
            yield heads, start, min(seq_len, start + rows)


def _zero_excluded(
    block: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
    *,
    row_start: int,
    column_start: int,
    keys_first: bool,
) -> None:
    """Zero, in place, the pairs of a score block that do not count: padded keys, and, when causal, keys
    after their query.

    block: (BH, rows, columns) holding positions row_start… × column_start…; rows are queries and columns
    keys, or the transpose when ``keys_first``. key_mask: (BH, N). Blocks never extend past the causal
    diagonal's square where rows and columns meet the same positions, so only that square is masked.
    """
    rows = block.shape[-2]
    if key_mask is not None:
        if keys_first:
            block.masked_fill_(~key_mask[:, row_start : row_start + rows, None], 0)
        else:
            block.masked_fill_(~key_mask[:, None, column_start : column_start + block.shape[-1]], 0)
    if causal:
        excluded = torch.ones(rows, rows, dtype=torch.bool, device=block.device)
        # (query a, key b) is excluded when b > a: above the diagonal, or below it in the transpose.
        excluded = excluded.tril_(-1) if keys_first else excluded.triu_(1)
        square = row_start - column_start
        block[..., square : square + rows].masked_fill_(excluded, 0)


def _row_scale(
    key_mask: torch.Tensor | None,
    batch: int,
    seq_len: int,
    *,
    alpha: float,
    causal: bool,
    length: int | None,
    dtype: torch.dtype,
    device: torch.device,
    packing: Packing | None = None,
) -> torch.Tensor:
    """L_i^(−alpha) as a (B or 1, 1, N, 1) tensor; L_i = number of keys row i sees unless ``length``
    (within its segment, for a packed row)."""
    if length is not None:
        counts = torch.full((1, seq_len), float(length), dtype=dtype, device=device)
    elif packing is not None:
        counts = (packing.positions() + 1 if causal else packing.lengths_at())[None].to(dtype)
    elif key_mask is None:
        if causal:
            counts = torch.arange(1, seq_len + 1, dtype=dtype, device=device)[None]
        else:
            counts = torch.full((1, seq_len), float(seq_len), dtype=dtype, device=device)
    else:
        real = key_mask.to(dtype)
        counts = real.cumsum(-1) if causal else real.sum(-1, keepdim=True).expand(batch, seq_len)
    # A row with no keys has an all-zero sum; clamping keeps 0 · L^-alpha at 0 instead of 0 · inf.
    return counts.clamp_min(1).pow(-alpha)[:, None, :, None]


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, N, D) → contiguous (B·H, N, D) in the compute dtype."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).to(dtype).contiguous()


class _PointwiseAttention(torch.autograd.Function):
    """Blocked forward (over query blocks) and backward (over key blocks) that recompute each score
    block instead of storing (B, H, N, N); the backward writes dk, dv once per block and accumulates dq."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, row_scale, activation, scale, causal):
        batch, heads, seq_len, _ = q.shape
        dtype = compute_dtype(q.dtype)
        q_scaled, keys, values = _flat(q, dtype) * scale, _flat(k, dtype), _flat(v, dtype)
        act = ACTIVATIONS[activation]
        out = q_scaled.new_empty(batch * heads, seq_len, v.shape[-1])
        for group, start, end in _tiles(batch * heads, seq_len, causal):
            key_end = end if causal else seq_len
            scores = torch.bmm(q_scaled[group, start:end], keys[group, :key_end].transpose(1, 2))
            weights = act.forward_(scores)
            mask = None if key_mask is None else key_mask[group]
            _zero_excluded(weights, mask, causal, row_start=start, column_start=0, keys_first=False)
            out[group, start:end] = torch.bmm(weights, values[group, :key_end])
        out = out.view(batch, heads, seq_len, -1).mul_(row_scale)
        ctx.save_for_backward(q, k, v, key_mask, row_scale)
        ctx.options = (activation, scale, causal)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_mask, row_scale = ctx.saved_tensors
        activation, scale, causal = ctx.options
        batch, heads, seq_len, _ = q.shape
        dtype = compute_dtype(q.dtype)
        q_scaled, keys, values = _flat(q, dtype) * scale, _flat(k, dtype), _flat(v, dtype)
        grad = _flat(grad_out.to(dtype) * row_scale, dtype)
        act = ACTIVATIONS[activation]
        grad_q = torch.zeros_like(q_scaled)
        grad_k, grad_v = torch.empty_like(keys), torch.empty_like(values)
        for group, start, end in _tiles(batch * heads, seq_len, causal):
            query_start = start if causal else 0  # earlier queries never see these keys
            queries, grads = q_scaled[group, query_start:], grad[group, query_start:]
            key_block = keys[group, start:end]
            scores = torch.bmm(key_block, queries.transpose(1, 2))  # (heads, keys, queries)
            weights = act.forward(scores) if act.needs_scores else act.forward_(scores)
            grad_weights = torch.bmm(values[group, start:end], grads.transpose(1, 2))
            mask = None if key_mask is None else key_mask[group]
            for pairs in (weights, grad_weights):
                _zero_excluded(
                    pairs, mask, causal, row_start=start, column_start=query_start, keys_first=True
                )
            torch.bmm(weights, grads, out=grad_v[group, start:end])
            grad_scores = act.backward(scores if act.needs_scores else None, weights, grad_weights)
            torch.bmm(grad_scores, queries, out=grad_k[group, start:end])
            grad_q[group, query_start:].baddbmm_(grad_scores.transpose(1, 2), key_block)
        grad_q.mul_(scale)
        shape = (batch, heads, seq_len, -1)
        return (
            grad_q.view(shape).to(q.dtype),
            grad_k.view(shape).to(k.dtype),
            grad_v.view(shape).to(v.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _check_pointwise_options(
    activation: str, alpha: float, length: int | None
) -> tuple[str, float, int | None]:
    return (
        check_choice("activation", activation, tuple(ACTIVATIONS)),
        check_real("alpha", alpha),
        check_positive_int("length", length, allow_none=True),
    )


@packable(lambda q, *_, **__: use_kernel("pointwise_attention", q), q=2, k=2, v=2)
def pointwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    activation: str = "relu",
    alpha: float = 1.0,
    scale: float | None = None,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    length: int | None = None,
    packing: Packing | None = None,
) -> torch.Tensor:
    """Pointwise attention: ``out_i = Σ_{j∈S(i)} φ(scale · q_i·k_j) · L_i^(−alpha) · v_j``.

    S(i) holds the real keys (j ≤ i when causal). φ is one of ``ACTIVATIONS``: relu, relu2 (relu(x)²),
    gelu (exact, erf), softplus, identity, relu6, sigmoid. ``length=None`` makes L_i = |S(i)|, the
    number of keys row i sees; an int makes L_i = length for every row (the papers' "divide by the
    sequence length"). GAU's attention is ``activation="relu2", alpha=1, scale=s**-0.5``.

    Computed in query blocks: memory is O(B·H·block·N), never (B, H, N, N), in forward and backward.
    Half-precision inputs are computed in float32 and the result cast back.

    Args:
        q, k: (B, H, N, Dk). v: (B, H, N, Dv).
        activation: the name of φ.
        alpha: exponent of the length normalisation (0 disables it).
        scale: multiplies q·k before φ; defaults to Dk^-1/2.
        causal: position i sees keys j ≤ i.
        attention_mask: (B, N), True/1 = real token; padded keys are excluded from the sum (and from L_i).
        length: None for L_i = |S(i)|, or a fixed positive int.
        cu_seqlens: (S + 1,) int64 cumulative segment lengths, batch size 1 (default None): the S
            segments of N are independent sequences, each as if called alone (docs/spec.md §8).
        packing: the plan of a cu_seqlens, ``Packing.of(cu_seqlens)`` (default None): for a model that
            calls many ops on one packed row and plans it once. Give cu_seqlens or packing, not both.

    Returns:
        (B, H, N, Dv), in the dtype of the inputs.
    """
    sizes = _check_qkv(q, k, v)
    causal = check_flag("causal", causal)
    activation, alpha, length = _check_pointwise_options(activation, alpha, length)
    scale = _default_scale(scale, sizes["K"])
    key_mask = check_attention_mask(attention_mask, sizes["B"], sizes["N"], q.device)
    if q.numel() == 0 or v.numel() == 0:
        return empty_output(v.shape, q, k, v)
    q, k, v, seen = _select_excluded(q, k, v, key_mask, causal, packing)
    row_scale = _row_scale(
        key_mask,
        sizes["B"],
        sizes["N"],
        alpha=alpha,
        causal=causal,
        length=length,
        dtype=compute_dtype(q.dtype),
        device=q.device,
        packing=packing,
    )
    if packing is not None or use_kernel("pointwise_attention", q):
        from ..kernels.pointwise_attention import pointwise_attention_fwd as kernel

        bounds = None if packing is None else packing.bounds
        out = kernel(q, k, v, key_mask, row_scale[:, 0, :, 0], activation, scale, bool(causal), bounds)
    else:
        flat_mask = None if key_mask is None else key_mask.repeat_interleave(sizes["H"], dim=0)  # (B·H, N)
        out = _PointwiseAttention.apply(q, k, v, flat_mask, row_scale, activation, scale, bool(causal))
    return out if seen is None else reinstate(out, seen)


def pointwise_attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    activation: str = "relu",
    alpha: float = 1.0,
    scale: float | None = None,
    length: int | None = None,
    key_mask: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Causal pointwise attention continued from a KV cache: the newest T queries q (B, H, T, Dk) over
    k (B, H, L, Dk), v (B, H, L, Dv), L ≥ T, causal offsets aligned to the end; ``key_mask`` (B, L),
    True = real key. Equals the last T rows of ``pointwise_attention(..., causal=True)``. ``causal=False``:
    every query sees every real key, L counting them all (default True)."""
    activation, alpha, length = _check_pointwise_options(activation, alpha, length)
    use_kernel("pointwise_attention", q, unsupported=_FROM_STATE)  # raises if triton is forced
    scale = _default_scale(scale, q.shape[-1])
    dtype = compute_dtype(q.dtype)
    scores = (q.to(dtype) * scale) @ k.to(dtype).transpose(-1, -2)
    if key_mask is None and (q.shape[-2] == 1 or not check_flag("causal", causal)):  # every key
        count = k.shape[-2] if length is None else length
        return ((ACTIVATIONS[activation].forward(scores) @ v.to(dtype)) * float(count) ** -alpha).to(q.dtype)
    allowed = _cached_allowed(q.shape[-2], k.shape[-2], key_mask, q.device, causal)
    weights = torch.where(
        allowed, ACTIVATIONS[activation].forward(scores), torch.zeros((), dtype=dtype, device=q.device)
    )
    values = v.to(dtype) if key_mask is None else real_only(v.to(dtype), key_mask, 2)
    count = allowed.sum(-1, keepdim=True).clamp_min(1).to(dtype) if length is None else float(length)
    return ((weights @ values) * count**-alpha).to(q.dtype)


softmax_attention_step = deprecated_alias(softmax_attention_cached, "softmax_attention_step")
pointwise_attention_step = deprecated_alias(pointwise_attention_cached, "pointwise_attention_step")

"""Packed variable-length sequences (docs/spec.md §8): ``cu_seqlens`` (S + 1,) marks S independent
segments [cu_seqlens[i], cu_seqlens[i+1]) of one packed row (B = 1).

The reference paths compute a packed call as the same call on the segments themselves: segments of
similar length are gathered into a few right-padded batches (lengths within an eighth of the power of
two below them, so no segment is padded by more than 12.5 % of its length, and quadratic ops cost about
Σ ℓ², never N²),
the op runs on each batch with the padding masked, and the outputs are put back where the tokens came
from. Every position-dependent term (positions, RoPE, AFT's w, convolution taps, FLASH's chunks) thereby
restarts at each segment's start and nothing crosses a boundary.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidTypeError, InvalidValueError


@dataclass(frozen=True)
class Bucket:
    """Segments of similar length as one right-padded batch: ``index`` (S_b, L_b) positions in the
    packed row (padding points at the segment's first token), ``mask`` (S_b, L_b) True = real,
    ``segments`` (S_b,) which segments they are."""

    index: torch.Tensor
    mask: torch.Tensor
    segments: torch.Tensor


@dataclass(frozen=True)
class Packing:
    total: int  # N
    lengths: tuple[int, ...]  # ℓ_i, S entries
    buckets: tuple[Bucket, ...]
    real_index: torch.Tensor  # (R,) packed positions of the buckets' real entries, in bucket order
    # (S + 1,) int64 on the host: the checked cu_seqlens as the kernels take them. A kernel lays out its
    # programs from the lengths (a table of each segment's blocks), which it reads here without waiting
    # on the device, and copies the bounds to the device for its programs to read.
    bounds: torch.Tensor

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, device: torch.device | str | None = None) -> Packing:
        """The plan of ``cu_seqlens`` (S + 1,) for a packed row of N = cu_seqlens[-1] positions, its index
        tensors on ``device`` (default: cu_seqlens'). Made once, it can be passed to every op and layer of
        a model as ``packing=`` in place of ``cu_seqlens``: one host read of the bounds, not one per op."""
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
            check_cu_seqlens(cu_seqlens, 1, 0)  # names what is wrong
        values = check_cu_seqlens(cu_seqlens, 1, int(cu_seqlens[-1]))
        return plan(cu_seqlens, torch.device(device) if device is not None else cu_seqlens.device, values)

    @property
    def segment_ids(self) -> torch.Tensor:
        """(N,) the segment of every packed position."""
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=self.real_index.device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=lengths.device), lengths)

    def positions(self) -> torch.Tensor:
        """(N,) each position's offset from its segment's start."""
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=self.real_index.device)
        starts = torch.cumsum(lengths, 0) - lengths
        return torch.arange(self.total, device=lengths.device) - starts.repeat_interleave(lengths)

    @property
    def longest(self) -> int:
        """The longest segment's length (0 when there are none)."""
        return max(self.lengths, default=0)

    def starts(self) -> torch.Tensor:
        """(N,) where each position's segment starts."""
        return torch.arange(self.total, device=self.real_index.device) - self.positions()

    def lengths_at(self) -> torch.Tensor:
        """(N,) the length of each position's segment."""
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=self.real_index.device)
        return lengths.repeat_interleave(lengths)


def check_cu_seqlens(
    cu_seqlens: object, batch: int, seq_len: int, attention_mask: object = None
) -> list[int]:
    """Validate cu_seqlens for a (B, N, …) input: an int tensor (S + 1,), 0 first, N last, non-decreasing,
    B = 1, no attention_mask beside it. Returns its values, read on the host once."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int64, torch.int32):
        raise InvalidTypeError(
            "cu_seqlens must be an int64/int32 tensor (S + 1,), got "
            f"{getattr(cu_seqlens, 'dtype', cu_seqlens)!r}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise InvalidValueError(f"cu_seqlens must have shape (S + 1,), got {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise InvalidValueError(
            f"cu_seqlens packs segments along N of a single row: batch size must be 1, got {batch}"
        )
    if attention_mask is not None:
        raise InvalidValueError(
            "cu_seqlens and attention_mask together: packed segments have no padding, pass one of them"
        )
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != seq_len:
        raise InvalidValueError(
            f"cu_seqlens must start at 0 and end at N={seq_len}, got {values[0]} … {values[-1]}"
        )
    if any(b < a for a, b in itertools.pairwise(values)):
        raise InvalidValueError(f"cu_seqlens must be non-decreasing, got {values}")
    return values


def _width(length: int) -> int:
    """The padded width a segment of ``length`` shares with others: ``length`` rounded up to a multiple
    of an eighth of the power of two at or below it. A bucket's width is its longest length, which is
    below a member's own length plus its step (≤ length / 8): no segment is padded by 12.5 % of its
    length or more. (An eighth of the power of two above, as before, padded 4097 to 5120: +25 %.)"""
    step = max(1, (1 << (length.bit_length() - 1)) // 8)
    return -(-length // step) * step


def plan(cu_seqlens: torch.Tensor, device: torch.device, values: list[int] | None = None) -> Packing:
    """The buckets of a checked ``cu_seqlens`` (one host read of its values, unless ``values`` are the
    ones already read)."""
    bounds = [int(b) for b in (cu_seqlens.tolist() if values is None else values)]
    lengths = tuple(b - a for a, b in itertools.pairwise(bounds))
    groups: dict[int, list[int]] = {}
    for segment, length in enumerate(lengths):
        if length:  # an empty segment has no output to compute
            groups.setdefault(_width(length), []).append(segment)
    buckets, real = [], []
    for key in sorted(groups):
        members = groups[key]
        width = max(lengths[s] for s in members)
        starts = torch.tensor([bounds[s] for s in members], dtype=torch.long, device=device)
        sizes = torch.tensor([lengths[s] for s in members], dtype=torch.long, device=device)
        steps = torch.arange(width, device=device)
        mask = steps[None, :] < sizes[:, None]
        index = starts[:, None] + torch.where(mask, steps[None, :], torch.zeros_like(steps)[None, :])
        buckets.append(Bucket(index, mask, torch.tensor(members, dtype=torch.long, device=device)))
        real.append(index[mask])
    real_index = torch.cat(real) if real else torch.zeros(0, dtype=torch.long, device=device)
    return Packing(bounds[-1], lengths, tuple(buckets), real_index, torch.tensor(bounds, dtype=torch.long))


def unpack(x: torch.Tensor, bucket: Bucket, dim: int = 1) -> torch.Tensor:
    """(1, …, N at ``dim``, …) → (S_b, …, L_b at ``dim``, …): the bucket's segments as a batch."""
    flat = x.squeeze(0).index_select(dim - 1, bucket.index.flatten())
    return flat.unflatten(dim - 1, tuple(bucket.index.shape)).movedim(dim - 1, 0)


def pack(outputs: Sequence[torch.Tensor], packing: Packing, dim: int = 1) -> torch.Tensor:
    """Per-bucket outputs (S_b, …, L_b at ``dim``, …) → (1, …, N at ``dim``, …)."""
    pieces = []
    for y, bucket in zip(outputs, packing.buckets, strict=True):
        y = y.movedim(0, dim - 1).flatten(dim - 1, dim)  # (…, S_b·L_b, …)
        pieces.append(y.index_select(dim - 1, bucket.mask.flatten().nonzero().squeeze(1)))
    real = torch.cat(pieces, dim - 1)
    shape = list(real.shape)
    shape[dim - 1] = packing.total
    return real.new_zeros(shape).index_copy(dim - 1, packing.real_index, real).unsqueeze(0)


def check_packing(packing: object, batch: int, seq_len: int, attention_mask: object = None) -> Packing:
    """Validate a ``Packing`` given for a (B, N, …) input: made for a row of N positions, B = 1, no
    attention_mask beside it."""
    if not isinstance(packing, Packing):
        raise InvalidTypeError(
            f"packing must be a Packing (Packing.of(cu_seqlens)), got {type(packing).__name__}"
        )
    if batch != 1:
        raise InvalidValueError(
            f"packing packs segments along N of a single row: batch size must be 1, got {batch}"
        )
    if packing.total != seq_len:
        raise InvalidValueError(f"packing was planned for N={packing.total}, the input has N={seq_len}")
    if attention_mask is not None:
        raise InvalidValueError(
            "packing and attention_mask together: packed segments have no padding, pass one of them"
        )
    return packing


def packing_of(
    cu_seqlens: torch.Tensor | None,
    batch: int,
    seq_len: int,
    attention_mask: object,
    device: torch.device,
    packing: Packing | None = None,
) -> Packing | None:
    """The one way a call's packed segments are read (docs/spec.md §8): the checked plan of
    ``cu_seqlens`` for a (B, N, …) input, or the ``packing`` already planned from one (a backbone plans
    once and hands the plan to every layer, rather than each layer reading cu_seqlens back from the
    device), or None without either."""
    if isinstance(cu_seqlens, Packing):  # what cu_seqlens took before packing= existed
        warnings.warn(
            "cu_seqlens=<Packing> is deprecated: pass the plan as packing=", DeprecationWarning, stacklevel=3
        )
        if packing is None:
            cu_seqlens, packing = None, cu_seqlens
    if packing is not None:
        if cu_seqlens is not None:
            raise InvalidValueError("cu_seqlens and packing together: packing is cu_seqlens' plan, pass one")
        return check_packing(packing, batch, seq_len, attention_mask)
    if cu_seqlens is None:
        return None
    return plan(cu_seqlens, device, check_cu_seqlens(cu_seqlens, batch, seq_len, attention_mask))


_PACKED = (
    inspect.Parameter(
        "cu_seqlens", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="torch.Tensor | None"
    ),
    inspect.Parameter("packing", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Packing | None"),
)


def packable(kernel: Callable[..., bool] | None = None, **dims: int) -> Callable:
    """The one way a functional op takes packed segments (docs/spec.md §8): gives an op the keywords
    ``cu_seqlens`` (a tensor) and ``packing`` (its plan, ``Packing.of(cu_seqlens)``). ``dims``: the
    inputs split into segments (name → the dim N is at; the first one's N is the output's).
    ``kernel(*args, **kwargs)``: whether the op's kernel takes this call's packed row whole (it reads each
    position's segment itself); the op is then called once with the checked ``packing``, which only such
    an op declares. Otherwise the op runs on the segments as right-padded batches (their padding as
    ``attention_mask``) and the outputs are packed back. Without either keyword the op is called as it is
    (no inspection: ``torch.compile`` traces straight through)."""

    def decorate(op: Callable) -> Callable:
        signature = inspect.signature(op)
        parameters = list(signature.parameters)
        assert (kernel is not None) == ("packing" in parameters), f"{op.__name__}: packing iff a kernel"
        where = {name: parameters.index(name) for name in dims}

        def dispatch(
            *args: Any, cu_seqlens: torch.Tensor | None = None, packing: Packing | None = None, **kwargs: Any
        ) -> Any:
            if cu_seqlens is None and packing is None:
                return op(*args, **kwargs)
            return _call_packed(op, kernel, dims, where, args, kwargs, cu_seqlens, packing)

        # A code object of its own per op: torch.compile caches graphs per code object, and ten ops
        # sharing one would recompile each other's frames (past its recompile limit).
        code = dispatch.__code__.replace(co_name=op.__name__, co_qualname=op.__qualname__)
        own = types.FunctionType(code, dispatch.__globals__, op.__name__, None, dispatch.__closure__)
        own.__kwdefaults__ = dispatch.__kwdefaults__
        own = functools.wraps(op)(own)
        kept = [p for p in signature.parameters.values() if p.name != "packing"]
        own.__signature__ = signature.replace(parameters=[*kept, *_PACKED])  # what a caller may pass
        return own

    return decorate


def _call_packed(op, kernel, dims, where, args, kwargs, cu_seqlens, packing):
    names = list(dims)
    inputs = [args[where[n]] if where[n] < len(args) else kwargs.get(n) for n in names]
    if not all(isinstance(t, torch.Tensor) and t.dim() > dims[n] for n, t in zip(names, inputs, strict=True)):
        return op(*args, **kwargs)  # the op's own check names what is wrong
    first, length = inputs[0], inputs[0].shape[dims[names[0]]]
    packing = packing_of(
        cu_seqlens, first.shape[0], length, kwargs.get("attention_mask"), first.device, packing
    )
    if kwargs.get("initial_state") is not None or kwargs.get("output_final_state"):
        raise InvalidValueError(
            "cu_seqlens with initial_state / output_final_state: a packed call has one state per segment; "
            "continue each sequence on its own"
        )
    if any(t.shape[0] != 1 or t.shape[dims[n]] != length for n, t in zip(names, inputs, strict=True)):
        return op(*args, **kwargs)  # mismatched sizes: the op's own check names them
    if kernel is not None and kernel(*args, **kwargs):
        return op(*args, packing=packing, **kwargs)

    def on_segments(*segments: torch.Tensor) -> torch.Tensor:
        *tensors, mask = segments
        positional, keywords = list(args), {**kwargs, "attention_mask": mask}
        for name, tensor in zip(names, tensors, strict=True):
            if where[name] < len(args):
                positional[where[name]] = tensor
            else:
                keywords[name] = tensor
        return op(*positional, **keywords)

    return packed_call(
        on_segments, [(t, dims[n]) for n, t in zip(names, inputs, strict=True)], packing, dims[names[0]]
    )


def packed_call(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[tuple[torch.Tensor, int]],
    packing: Packing,
    out_dim: int = 1,
) -> torch.Tensor:
    """``fn(*segments, mask)`` on each bucket's segments as a right-padded batch (mask (S_b, L_b), True =
    real), the outputs packed back. ``inputs``: (tensor (1, …), the dim N is at). Segments cover N, so
    every output position is some segment's."""
    if not packing.buckets:  # N = 0: the call on the (empty) row itself
        return fn(*(t for t, _ in inputs), None)
    outputs = [fn(*(unpack(t, bucket, dim) for t, dim in inputs), bucket.mask) for bucket in packing.buckets]
    return pack(outputs, packing, out_dim)

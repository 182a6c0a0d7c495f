"""Argument validation shared by every op: one place, one wording.

Every check raises ``TypeError`` for a wrong kind of value (not a tensor, wrong dtype, not an int) and
``ValueError`` for a wrong shape or an out-of-range value, always naming the argument and what was
expected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidTypeError, InvalidValueError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, value: object, layout: str) -> torch.Tensor:
    """Check that ``value`` is a floating tensor whose rank matches ``layout`` (e.g. ``"(B, H, N, D)"``)."""
    if not isinstance(value, torch.Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise InvalidTypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {value.dtype}"
        )
    rank = layout.count(",") + 1
    if value.dim() != rank:
        raise InvalidValueError(
            f"{name} must have shape {layout} ({rank} dims), got shape {tuple(value.shape)}"
        )
    return value


def check_same_dtype_device(**tensors: torch.Tensor) -> None:
    """All tensors share one dtype and one device."""
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        other = tensors[name]
        if other.dtype != first.dtype:
            raise InvalidTypeError(
                f"{name} has dtype {other.dtype} but {names[0]} has {first.dtype}; they must match"
            )
        if other.device != first.device:
            raise InvalidValueError(
                f"{name} is on {other.device} but {names[0]} is on {first.device}; they must match"
            )


def check_dims(expected: dict[str, int], **tensor_dims: tuple[torch.Tensor, Sequence[str]]) -> dict[str, int]:
    """Check named dimensions agree across tensors.

    ``tensor_dims`` maps an argument name to (tensor, dim names), e.g. ``q=(q, "BHND")``. A dim name seen
    twice must have the same size; sizes already in ``expected`` are enforced too. Returns the sizes.
    """
    sizes = dict(expected)
    origin = {name: "expected" for name in expected}
    for arg, (tensor, dim_names) in tensor_dims.items():
        for axis, dim_name in enumerate(dim_names):
            size = tensor.shape[axis]
            if dim_name in sizes and sizes[dim_name] != size:
                raise InvalidValueError(
                    f"{arg} has {dim_name}={size} at dim {axis} (shape {tuple(tensor.shape)}) but "
                    f"{origin[dim_name]} has {dim_name}={sizes[dim_name]}; they must match"
                )
            sizes.setdefault(dim_name, size)
            origin.setdefault(dim_name, arg)
    return sizes


def check_attention_mask(
    attention_mask: torch.Tensor | None, batch_size: int, seq_len: int, device: torch.device
) -> torch.Tensor | None:
    """Validate a (B, N) padding mask (True/1 = real token) and return it as a bool tensor, or None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise InvalidTypeError(
            f"attention_mask must be a bool or 0/1 tensor of shape (B, N) = ({batch_size}, {seq_len}) "
            f"or None, got {type(attention_mask).__name__}"
        )
    if tuple(attention_mask.shape) != (batch_size, seq_len):
        raise InvalidValueError(
            f"attention_mask must have shape (B, N) = ({batch_size}, {seq_len}), "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != device:
        raise InvalidValueError(
            f"attention_mask is on {attention_mask.device} but the inputs are on {device}"
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_complex() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise InvalidValueError(
            "attention_mask must hold only 0/1 (or True/False): 1 = real token, 0 = padding"
        )
    return attention_mask.bool()


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "a positive int or None" if allow_none else "a positive int"
        raise InvalidTypeError(f"{name} must be {expected}, got {value!r}")
    if value <= 0:
        raise InvalidValueError(f"{name} must be positive, got {value}")
    return value


def check_real(name: str, value: object, *, allow_none: bool = False, positive: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(
            f"{name} must be a real number{' or None' if allow_none else ''}, got {value!r}"
        )
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise InvalidValueError(f"{name} must be positive, got {value}")
    return value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums run in: float32 for half types (they would overflow), else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_flag(name: str, value: object) -> bool:
    """A True/False option (``causal``, ``weight_softmax``): a string such as "no" is not one."""
    if not isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be True or False, got {value!r}")
    return value


def empty_output(shape: Sequence[int], *inputs: torch.Tensor) -> torch.Tensor:
    """The result of a call over no positions (B = 0 or N = 0): an empty tensor of ``shape`` that depends
    on every input, so that backward runs and gives them zero gradients."""
    first = inputs[0]
    anchor = sum(t.sum() * 0 for t in inputs)  # no value survives in an empty result
    return torch.zeros(shape, dtype=first.dtype, device=first.device) + anchor.to(first.dtype)

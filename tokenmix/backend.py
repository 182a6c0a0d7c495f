"""Which implementation runs an op: the reference PyTorch path (the spec) or a fused Triton kernel.

``tokenmix.use_backend("auto" | "reference" | "triton")`` (a context manager) or the ``TOKENMIX_BACKEND``
environment variable choose. ``auto`` (the default) takes a kernel for CUDA tensors when one covers the
call, the reference path otherwise. ``triton`` forces the kernel and raises, saying why, where none
covers the call — never a silent fallback. Kernels also run on CPU tensors under ``TRITON_INTERPRET=1``
(Triton's interpreter), which is how CI tests them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from .errors import InvalidValueError, UnavailableError

BACKENDS = ("auto", "reference", "triton")
# A module global rather than a ContextVar: torch.compile reads it (and guards on it) while tracing.
_selected: str | None = None


def _check(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise InvalidValueError(f"{origin} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost ``use_backend``, else ``$TOKENMIX_BACKEND``, else ``auto``."""
    if _selected is not None:
        return _selected
    return _check(os.environ.get("TOKENMIX_BACKEND", "auto"), "TOKENMIX_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops called inside the block on ``name``'s implementation (process-wide, not per thread;
    a function compiled inside the block keeps the choice and recompiles if it changes)."""
    global _selected
    previous, _selected = _selected, _check(name, "backend")
    try:
        yield
    finally:
        _selected = previous


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# A file-system search, once per process (not once per op call, and not inside a compiled graph).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_FOUND


def auto_takes_kernels(tensor: torch.Tensor) -> bool:
    """Whether ``auto`` runs the kernels for tensors on this device: on CUDA only (under the interpreter
    on the CPU they are slower than the reference path; tests patch this to see ``auto`` choose as it
    would on a GPU)."""
    return tensor.device.type == "cuda"


def use_kernel(
    op: str, tensor: torch.Tensor, unsupported: str | None = None, *, atomics: bool = False
) -> bool:
    """Whether ``op`` runs its Triton kernel for a call on ``tensor``'s device and dtype. ``unsupported``
    says why the kernel does not cover this call's options, or is None when it does. No kernel takes
    float64. ``atomics``: this call's backward kernel would add with atomics, whose order (so whose
    rounding) varies from run to run — under ``torch.use_deterministic_algorithms(True)`` ``auto`` takes
    the reference path instead and forced ``triton`` raises, as PyTorch does for its own such ops."""
    backend = get_backend()
    if backend == "reference":
        return False
    reason = unsupported
    if reason is None and atomics and torch.are_deterministic_algorithms_enabled():
        reason = (
            "its backward adds with atomics (not bit-reproducible) and "
            "torch.use_deterministic_algorithms(True) is set"
        )
    if reason is None and tensor.dtype == torch.float64:
        reason = "float64 runs on the reference path only"
    if reason is None and not triton_installed():
        reason = "Triton is not installed (pip install triton)"
    if reason is None and tensor.device.type != "cuda" and not interpreting():
        reason = (
            f"the tensors are on {tensor.device.type}; the kernels run on CUDA (or under TRITON_INTERPRET=1)"
        )
    if backend == "triton":
        if reason is not None:
            raise UnavailableError(f"{op}: the triton backend was asked for, but {reason}")
        return True
    return reason is None and auto_takes_kernels(tensor)

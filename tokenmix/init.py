"""Modules that initialise themselves: a model built on the meta device and materialised gets, for a seed,
exactly the weights eager construction gives (docs/spec.md §11).

Eager construction and ``reset_parameters()`` are one code path: a self-initialising module's outermost
constructor builds the modules (the draws their default initialisers make are discarded), then calls
``reset_parameters()`` from the random state as it stood when construction began. So::

    torch.manual_seed(s); eager = LanguageModel(...)

    with torch.device("meta"):
        model = LanguageModel(...)              # no memory, no initialisation
    model.to_empty(device="cpu")
    torch.manual_seed(s); model.reset_parameters()   # == eager, bit for bit
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

_building = threading.local()  # how deep in self-initialising constructors this thread is


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule once, children before their parent (a parent's init may override theirs)."""
    seen: set[int] = set()

    def visit(current: nn.Module) -> Iterator[nn.Module]:
        if id(current) in seen:
            return
        seen.add(id(current))
        for child in current.children():
            yield from visit(child)
        yield current

    return visit(module)


def own_initialiser(module: nn.Module) -> Callable[[], None] | None:
    """What initialises ``module``'s own parameters and buffers: ``init_own`` for ours, torch's layers'
    ``reset_parameters`` (each initialises only its own tensors)."""
    if isinstance(module, SelfInitialising):
        return module.init_own
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if not own:
        return None
    reset = getattr(module, "reset_parameters", None)
    if reset is None:  # a library bug: a module that cannot initialise itself breaks meta construction
        raise TypeError(f"{type(module).__name__} has tensors of its own but no reset_parameters()")
    return reset


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _accelerators() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def _outermost_resets(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: SelfInitialising, *args: Any, **kwargs: Any) -> None:
        if getattr(_building, "depth", 0):  # an inner constructor: the outermost one initialises
            init(self, *args, **kwargs)
            return
        _building.depth = 1
        try:
            with torch.random.fork_rng(devices=_accelerators()):  # building's own draws are discarded
                init(self, *args, **kwargs)
        finally:
            _building.depth = 0
        if not _on_meta(self):
            self.reset_parameters()

    return __init__


class SelfInitialising(nn.Module):
    """A module whose ``reset_parameters()`` redraws every parameter and buffer of it and its submodules,
    in one fixed order (children before parents; each module's ``init_own``, or a torch layer's
    ``reset_parameters``), from the random state as it stands. Eager construction ends with that call."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__ = _outermost_resets(cls.__init__)

    def init_own(self) -> None:
        """Initialise this module's own parameters and buffers (not its submodules'); none by default."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter and buffer of this module and its submodules."""
        for module in _post_order(self):
            own = own_initialiser(module)
            if own is not None:
                own()

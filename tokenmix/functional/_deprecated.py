"""Old names kept working while users move to the new ones."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable


def deprecated_alias(new: Callable, old_name: str) -> Callable:
    """``new`` under ``old_name``, warning (DeprecationWarning) at each call that the name will go."""

    @functools.wraps(new)
    def alias(*args, **kwargs):
        warnings.warn(
            f"{old_name} is deprecated; use {new.__name__} (same arguments)", DeprecationWarning, stacklevel=2
        )
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name
    return alias

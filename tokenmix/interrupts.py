"""Stopping long work promptly and cleanly: SIGTERM raised as Ctrl-C is, and blocking native calls
(``tokenizers``' Rust) that Ctrl-C can interrupt.

Python runs a signal handler only between bytecodes of the main thread; a call into native code that
runs for a minute (learning BPE, encoding a batch) delays Ctrl-C by as long. ``interruptible`` runs such
a call on a daemon thread and waits for it in short slices, so the main thread raises at once; the call
itself runs on until it returns (its result dropped), or until the process exits.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
WAIT_SECONDS = 0.05  # how long a signal may wait for the main thread


class TerminateRaises:
    """Within the block, SIGTERM raises ``make()`` (a ``KeyboardInterrupt``) as Ctrl-C raises one, so
    that ``finally`` blocks clean up on either (main thread only: elsewhere it does nothing)."""

    def __init__(self, make: Callable[[], BaseException]) -> None:
        self.make = make
        self._previous: Any = None

    def __enter__(self) -> TerminateRaises:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        raise self.make()

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def interruptible(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)``, during which Ctrl-C (and ``TerminateRaises``' SIGTERM) acts within
    ``WAIT_SECONDS`` (see the module docstring). Off the main thread it is a plain call."""
    if threading.current_thread() is not threading.main_thread():
        return function(*args, **kwargs)
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as error:  # handed to the caller's thread as it is
            outcome["error"] = error
        finally:
            done.set()

    name = f"tokenmix-{getattr(function, '__name__', 'call')}"
    threading.Thread(target=run, daemon=True, name=name).start()
    while not done.wait(WAIT_SECONDS):
        pass
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


__all__ = ["TerminateRaises", "interruptible"]

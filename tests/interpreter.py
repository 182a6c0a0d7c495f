"""Triton's interpreter (the CPU tests' way to run the kernels) without its redundant re-patching.

On every call of a ``@triton.jit`` helper from inside a kernel, the interpreter patches ``triton.language``
again, though the kernel's launch patched it already: about a fifth of the kernel tests' time. Here a
helper's call skips that patch when every language module it sees is already patched in this launch (a
helper that sees another, ``triton.language.core`` for ``tl.zeros``, still patches it, as stock does).
Nothing else changes. Installed only over the interpreter this was written against: a Triton whose
helper call differs from ``STOCK_HELPER_CALL`` keeps its own.
"""

from __future__ import annotations

import inspect

STOCK_HELPER_CALL = """    def __call__(self, *args, **kwargs):
        # This is a device function call
        _patch_lang(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise InterpreterError(repr(e)) from e
"""


def install() -> bool:
    """Whether the faster helper call was installed (False: this Triton's own is kept)."""
    import triton.language as tl
    from triton.runtime import interpreter

    helper_call = interpreter.InterpretedFunction.__call__
    if getattr(helper_call, "skips_patched", False):
        return True
    if inspect.getsource(helper_call) != STOCK_HELPER_CALL:
        return False
    launch = interpreter.GridExecutor.__call__
    patched: set[int] = set()  # the language modules patched in the launch running now
    depth = [0]

    seen: dict = {}  # a function's language modules, by function (reading its globals every call cost 3 %)

    def languages(fn) -> frozenset[int]:
        if fn not in seen:
            found = (id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
            seen[fn] = frozenset(found)
        return seen[fn]

    def launch_call(self, *args, **kwargs):
        saved = set(patched)
        depth[0] += 1
        patched.update(languages(self.fn))  # what the launch's own patch covers
        try:
            return launch(self, *args, **kwargs)
        finally:
            depth[0] -= 1
            patched.clear()
            patched.update(saved)

    def call(self, *args, **kwargs):
        if not depth[0] or not languages(self.fn) <= patched:
            if depth[0]:
                patched.update(languages(self.fn))
            return helper_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    call.skips_patched = True
    interpreter.GridExecutor.__call__ = launch_call
    interpreter.InterpretedFunction.__call__ = call
    return True

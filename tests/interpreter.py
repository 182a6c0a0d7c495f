"""Triton's interpreter (the CPU tests' way to run the kernels), faster and computing the same values: no
redundant re-patching, scans a step along the axis at a time, types looked up rather than rebuilt.

On every call of a ``@triton.jit`` helper from inside a kernel, the interpreter patches ``triton.language``
again, though the kernel's launch patched it already: about a fifth of the kernel tests' time. Here a
helper's call skips that patch when every language module it sees is already patched in this launch (a
helper that sees another, ``triton.language.core`` for ``tl.zeros``, still patches it, as stock does).
A ``tl.associative_scan`` with a combine function of its own (the AFT scans) ran element by element: the
combine once per element of the block, each on one scalar. Here it runs once per step along the scanned
axis, on that step's whole slice: the same operations on each element, in the same order, so the same
values, in a sixty-fourth of the calls for a 64 × 64 block.

Every operation also built its block type afresh and rebuilt the table of numpy types; both are now
looked up, keyed by what decides them.

Nothing else changes. Each part is installed only over the interpreter source it was written against
(``STOCK_HELPER_CALL``, ``STOCK_SCAN``, ``STOCK_TYPES``: SHA-256 digests); another Triton keeps its own.
"""

from __future__ import annotations

import hashlib
import inspect

import numpy as np

STOCK_HELPER_CALL = "f2446df46264004916b677478c2eef6ef349bd2c04a99da9eade596b78cd54d8"
STOCK_SCAN = "625569e90b9eda9ac1a1f5b522d02d78085455c325e3fd791ba39f158a149be8"
STOCK_TYPES = (
    "8f20d41e3207891ae9872819aff05bee11d5c9bbe24f772282cb3ac72749fc75",
    "403f4b016ec5c2c37f33465d4ceab2d800bc4dcb832ce1859b0a7cd4a6f65763",
)


def _is_stock(functions: tuple, digests: tuple[str, ...]) -> bool:
    """Whether these functions' sources are the ones this file was written against."""
    found = tuple(hashlib.sha256(inspect.getsource(f).encode()).hexdigest() for f in functions)
    return found == digests


def install() -> bool:
    """Whether every faster part was installed (each not installed keeps this Triton's own)."""
    import triton.language as tl
    from triton.runtime import interpreter

    scan, types = install_scan(interpreter.ScanOps, tl), install_types(interpreter, tl)
    return install_helper_call(interpreter, tl) and scan and types


def install_helper_call(interpreter, tl) -> bool:
    """Whether a helper's call skips the patch its launch already made (False: the stock call is kept)."""
    helper_call = interpreter.InterpretedFunction.__call__
    if getattr(helper_call, "skips_patched", False):
        return True
    if not _is_stock((helper_call,), (STOCK_HELPER_CALL,)):
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


def install_scan(scans: type, tl) -> bool:
    """Whether the scan by slices was installed over ``scans.generic_scan`` (False: the stock one is kept)."""
    stock = scans.generic_scan
    if getattr(stock, "by_slices", False):
        return True
    if not _is_stock((stock,), (STOCK_SCAN,)):
        return False

    def generic_scan(self, inputs):
        data = [tensor.handle.data for tensor in inputs]
        out = [np.zeros_like(array) for array in data]  # in the input's dtype, as stock stores each value
        steps = data[0].shape[self.axis]

        def at(step: int) -> tuple:
            return (slice(None),) * self.axis + (step,)

        for array, result in zip(data, out, strict=True):
            result[at(0)] = array[at(0)]
        for step in range(1, steps):
            carried = (self.to_tensor(o[at(step - 1)], t.dtype) for o, t in zip(out, inputs, strict=True))
            current = (self.to_tensor(d[at(step)], t.dtype) for d, t in zip(data, inputs, strict=True))
            combined = self.combine_fn.fn(*carried, *current)
            combined = combined if isinstance(combined, tuple) else (combined,)
            for result, value in zip(out, combined, strict=True):
                result[at(step)] = value.handle.data if isinstance(value, tl.core.tensor) else value
        return [self.to_tensor(result, tensor.dtype) for result, tensor in zip(out, inputs, strict=True)]

    generic_scan.by_slices, generic_scan.stock = True, stock
    scans.generic_scan = generic_scan
    return True


def install_types(interpreter, tl) -> bool:
    """Whether the interpreter's types are looked up, not rebuilt (False: the stock ones are kept). Every
    operation built a block type afresh (its shape unwrapped, checked a power of two, named) and rebuilt
    the table of numpy types to find its data's: both now come from a table keyed by what decides them."""
    stock_np_dtype, stock_init = interpreter._get_np_dtype, tl.block_type.__init__
    if getattr(stock_np_dtype, "looked_up", False):
        return True
    if not _is_stock((stock_np_dtype, stock_init), STOCK_TYPES):
        return False
    np_dtypes: dict = {}
    blocks: dict = {}

    def np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(scalar, tl.pointer_type):  # unhashable; stock answers it first thing
            return stock_np_dtype(scalar)
        if scalar not in np_dtypes:  # a block's is its element's, as in stock
            np_dtypes[scalar] = stock_np_dtype(scalar)
        return np_dtypes[scalar]

    def init(self, element_ty, shape):
        items = shape.values if type(shape) is tl.core.tuple else shape
        if type(items) is not list or isinstance(element_ty, tl.pointer_type):  # stock refuses a tuple's
            return stock_init(self, element_ty, shape)  # (and the pointer is unhashable)
        dims = tuple(d.value if type(d) is tl.constexpr else d for d in items)  # as stock unwraps them
        if any(type(d) is not int for d in dims):
            return stock_init(self, element_ty, shape)
        key = (element_ty, dims)
        if key not in blocks:
            stock_init(self, element_ty, shape)  # checks the shape, raising as stock does
            blocks[key] = (self.shape.type, self.numel, self.name)
            return None
        shape_type, numel, name = blocks[key]
        self.element_ty, self.numel, self.name = element_ty, numel, name
        self.shape = tl.core.tuple(list(dims), shape_type)  # a shape of its own, as stock makes one
        return None

    np_dtype.looked_up, np_dtype.stock, init.stock = True, stock_np_dtype, stock_init
    interpreter._get_np_dtype = np_dtype
    tl.block_type.__init__ = init
    return True

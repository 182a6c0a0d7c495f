"""Triton building blocks shared by the kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import interpreting


def dot_flags(dtype: torch.dtype) -> dict:
    """The ``dot`` options for inputs of ``dtype``: exact (IEEE) float32 products, not TF32; float32
    operands in place of bfloat16 ones under the interpreter."""
    return {
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": interpreting() and dtype == torch.bfloat16,
    }


def segment_arguments(like: torch.Tensor, cu_seqlens: torch.Tensor | None, block: int) -> tuple:
    """What a kernel launched over packed segments (docs/spec.md §8) reads, as flash-linear-attention lays
    them out: the bounds (S + 1,) int32 on ``like``'s device and the table of row blocks, (P, 2) int32
    pairs (segment, block within it), each segment cut into blocks of ``block`` from its own start, so no
    program spans two segments or falls past its segment's end. Also P, the programs along the rows.
    Without ``cu_seqlens``: stand-ins the kernel never reads (``like``), and P = cdiv(N, block) of
    ``like``'s rows (dim −2).

    The table is made where ``cu_seqlens`` lies: a plan's bounds are on the host (``Packing.bounds``), so
    a packed model never waits on the device for it; P is the table's shape, not a value read back."""
    if cu_seqlens is None:
        return like, like, triton.cdiv(like.shape[-2], block)
    lengths = cu_seqlens.diff().long()
    blocks = (lengths + block - 1) // block  # (S,) per segment
    segment = torch.repeat_interleave(torch.arange(len(blocks), device=blocks.device), blocks)  # (P,)
    within = torch.arange(len(segment), device=blocks.device) - (torch.cumsum(blocks, 0) - blocks)[segment]
    table = torch.stack([segment, within], 1) if len(segment) else torch.zeros(1, 2, dtype=torch.long)
    return segment_bounds(like, cu_seqlens), table.to(device=like.device, dtype=torch.int32), len(segment)


def segment_bounds(like: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """cu_seqlens as the kernels read it, int32 on ``like``'s device (``like`` stands in without it)."""
    if cu_seqlens is None:
        return like
    return cu_seqlens.to(device=like.device, dtype=torch.int32).contiguous()


def int8_mask(like: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """The (B, N) key mask as contiguous int8 for a kernel; an empty tensor when there is none (the
    kernel then never reads it)."""
    if key_mask is None:
        return like.new_empty(0, dtype=torch.int8)
    return key_mask.to(torch.int8).contiguous()


@triton.jit
def logaddexp(x, y):
    """log(eˣ + eʸ), −inf when both are −inf."""
    top = tl.maximum(x, y)
    u = tl.exp(-tl.abs(tl.where(top == float("-inf"), 0.0, x - y)))
    sum_ = 1.0 + u
    log1p = tl.log(sum_) - ((sum_ - 1.0) - u) / sum_  # log1p(u), accurate for small u
    return tl.where(top == float("-inf"), float("-inf"), top + log1p)


@triton.jit
def linear_combine(decay_1, value_1, decay_2, value_2):
    """Composition of h ← decay·h + value steps, for tl.associative_scan (forward or reverse)."""
    return decay_1 * decay_2, value_1 * decay_2 + value_2


@triton.jit
def row_of(x, rows, index):
    """The row of a (R, C) tile whose entry in ``rows`` is ``index``, as (C,)."""
    return tl.sum(tl.where(rows[:, None] == index, x, 0.0), 0)


@triton.jit
def exp_difference(x, y):
    """e^(x − y), 0 where x is −inf (also when y is)."""
    return tl.exp(tl.where(x == float("-inf"), float("-inf"), x - y))


@triton.jit
def slice_offset(index, rows, width):
    """Where slice ``index`` of (rows, width) slices starts: the product in 64 bits, since for a tensor
    of more than 2**31 elements it passes what an int32 holds (program ids and sizes are int32)."""
    return index.to(tl.int64) * rows * width


@triton.jit
def sequence_of(index, cu_ptr, seq_len, VARLEN: tl.constexpr):
    """Sequence ``index``: its batch row, its first position within that row (int64) and its length.
    Batch row ``index`` of N positions, or (VARLEN) segment ``index`` of the one packed row, its bounds
    read from cu_seqlens: a program then offsets its pointers to its segment and never loads another's
    positions (so nothing, not even a NaN, crosses a boundary)."""
    if VARLEN:
        start = tl.load(cu_ptr + index).to(tl.int64)
        length = (tl.load(cu_ptr + index + 1) - start).to(tl.int32)
        batch = index * 0
    else:
        start = (index * 0).to(tl.int64)
        length = seq_len
        batch = index
    return batch, start, length


@triton.jit
def row_offset(batch, origin, seq_len, width):
    """Where a sequence's first row lies in a (B, N, width) tensor: row ``origin`` of batch row ``batch``."""
    return slice_offset(batch, seq_len, width) + origin * width


@triton.jit
def block_of(block_program, sequence_program, table_ptr, VARLEN: tl.constexpr):
    """(sequence, block within it) of a program over blocks of rows: the grid's own indices, or (VARLEN)
    the pair the block table lists for this program (see ``segment_arguments``)."""
    if VARLEN:
        sequence = tl.load(table_ptr + 2 * block_program)
        block = tl.load(table_ptr + 2 * block_program + 1)
    else:
        sequence = sequence_program
        block = block_program
    return sequence, block


@triton.jit
def load_rows(ptr, rows, columns, seq_len, width, stride, other):
    """x[rows, columns] of a row-major (seq_len, ≥ width) matrix with row ``stride``; ``other`` where a
    row falls outside [0, seq_len) or a column past ``width``."""
    inside = (rows[:, None] >= 0) & (rows[:, None] < seq_len) & (columns[None, :] < width)
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride + columns[None, :], inside, other)


@triton.jit
def store_rows(ptr, x, rows, columns, seq_len, width, stride):
    """The counterpart of load_rows: x cast to the pointer's dtype, rows and columns in range only."""
    inside = (rows[:, None] >= 0) & (rows[:, None] < seq_len) & (columns[None, :] < width)
    tl.store(ptr + rows[:, None].to(tl.int64) * stride + columns[None, :], x.to(ptr.dtype.element_ty), inside)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's interpreter multiplies bfloat16 dot operands wrongly, so it gets float32 ones.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def key_visible(rows, columns, mask_ptr, seq_len, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """(len(rows), len(columns)) bool: query row sees key column (in range, real, and not in the future)."""
    valid = (rows[:, None] < seq_len) & (columns[None, :] < seq_len)
    if HAS_MASK:
        real = tl.load(mask_ptr + columns, mask=columns < seq_len, other=0)
        valid = valid & (real[None, :] != 0)
    if CAUSAL:
        valid = valid & (columns[None, :] <= rows[:, None])
    return valid

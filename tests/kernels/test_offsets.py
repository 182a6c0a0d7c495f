"""Offsets in the kernels are 64-bit wherever a product can pass 2**31 (a tensor of more than 2**31
elements): each kernel's own index helper — the code the kernel adds to its pointers — is run here on
indices whose products pass 2**31, without allocating such a tensor. Under Triton's interpreter an int32
product wraps as on a GPU, so an index helper computing in 32 bits fails these tests."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmix.kernels._common import slice_offset
from tokenmix.kernels.aft.common import key_offset
from tokenmix.kernels.aft.local import band_offset
from tokenmix.kernels.conv import dynamic_tap_offset, partial_offset
from tokenmix.kernels.flash import chunk_offset

BLOCK = 4
LIMIT = 2**31 - 1


@triton.jit
def _slice_kernel(out_ptr, rows, width):
    index = tl.program_id(0)
    tl.store(out_ptr + index, slice_offset(index, rows, width))


@triton.jit
def _conv_kernel(out_ptr, first_row, heads, head, kernel_size, tap, BLOCK: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK)  # int32, as a kernel's rows are
    tl.store(out_ptr + tl.arange(0, BLOCK), dynamic_tap_offset(rows, heads, head, kernel_size, tap))
    tl.store(out_ptr + BLOCK, partial_offset(first_row + 0 * tl.program_id(0), heads, head, kernel_size))


@triton.jit
def _band_kernel(out_ptr, first_row, head, index, row_stride, head_stride, BLOCK: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.arange(0, BLOCK), band_offset(rows, head, index, row_stride, head_stride))


@triton.jit
def _key_kernel(out_ptr, first_row, key_width, head, BLOCK: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.arange(0, BLOCK), key_offset(rows, key_width, head))


@triton.jit
def _chunk_kernel(out_ptr, first, last, chunk_stride):
    for chunk in range(first, last + 1):  # the loop _chunk_linear runs
        tl.store(out_ptr + chunk - first, chunk_offset(chunk, chunk_stride))


def _run(kernel, size: int, *arguments, **constants) -> list[int]:
    out = torch.zeros(size, dtype=torch.int64)
    kernel[(1,)](out, *arguments, **constants)
    return out.tolist()


def test_slice_offsets_do_not_wrap_past_2_to_the_31():
    rows, width = 1 << 20, 3 << 10  # 3·2**30 elements per slice: int32 products wrap from index 1 on
    out = torch.zeros(5, dtype=torch.int64)
    _slice_kernel[(5,)](out, rows, width)
    assert out.tolist() == [index * rows * width for index in range(5)]
    assert out[1].item() > LIMIT


def test_dynamic_convolution_offsets_do_not_wrap():
    """(B·N, H, K) kernels: 6M rows × 16 heads × 31 taps ≈ 3·10⁹ entries."""
    first_row, heads, head, kernel_size, tap = 6_000_000, 16, 5, 31, 7
    got = _run(_conv_kernel, BLOCK + 1, first_row, heads, head, kernel_size, tap, BLOCK=BLOCK)
    rows = range(first_row, first_row + BLOCK)
    assert got[:BLOCK] == [(row * heads + head) * kernel_size + tap for row in rows]
    assert got[BLOCK] == (first_row * heads + head) * kernel_size  # the shared kernel's partial sums
    assert min(got) > LIMIT


def test_aft_band_offsets_do_not_wrap():
    """AFT-local's band (N, H, 2w − 1): 1.5M rows with a row stride of 8 heads × 255 taps."""
    first_row, head, index, row_stride, head_stride = 1_500_000, 3, 100, 8 * 255, 255
    got = _run(_band_kernel, BLOCK, first_row, head, index, row_stride, head_stride, BLOCK=BLOCK)
    expected = [row * row_stride + head * head_stride + index for row in range(first_row, first_row + BLOCK)]
    assert got == expected and min(got) > LIMIT


def test_aft_key_gradient_offsets_do_not_wrap():
    first_row, key_width, head = 300_000_000, 8, 6  # one key per head, 2.4·10⁹ entries
    got = _run(_key_kernel, BLOCK, first_row, key_width, head, BLOCK=BLOCK)
    assert got == [row * key_width + head for row in range(first_row, first_row + BLOCK)]
    assert min(got) > LIMIT


def test_flash_chunk_state_offsets_do_not_wrap():
    """FLASH's per-chunk (S, E) states: chunk 40 000 of 128 × 512 floats is past 2**31."""
    first, last, chunk_stride = 40_000, 40_003, 128 * 512
    got = _run(_chunk_kernel, last - first + 1, first, last, chunk_stride)
    assert got == [chunk * chunk_stride for chunk in range(first, last + 1)]
    assert min(got) > LIMIT

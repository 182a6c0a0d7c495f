"""Slice offsets in the kernels are 64-bit: index · rows · width past 2**31 (a tensor of more than 2**31
elements) does not wrap, checked through the helper every kernel uses, without allocating such a tensor."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmix.kernels._common import slice_offset


@triton.jit
def _offsets_kernel(out_ptr, rows, width):
    index = tl.program_id(0)
    tl.store(out_ptr + index, slice_offset(index, rows, width))


def test_slice_offsets_do_not_wrap_past_2_to_the_31(device):
    rows, width = 1 << 20, 3 << 10  # 3·2**30 elements per slice: int32 products wrap from index 1 on
    out = torch.zeros(5, dtype=torch.int64, device=device)
    _offsets_kernel[(5,)](out, rows, width)
    assert out.tolist() == [index * rows * width for index in range(5)]
    assert out[1].item() > 2**31 - 1

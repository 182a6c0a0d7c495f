"""Lightweight and dynamic convolution for any kernel size: y[b,t,c] = Σ_j W̃[h(c), j] x[b, t+j−P, c],
with W̃ one kernel per head (lightconv) or one per position and head (dynamic_conv).

Programs: one per (time block, batch·head), over the head's channels; the taps are a runtime loop, so
K is not limited to a compiled set (fairseq's CUDA kernels take a few sizes only). The backward walks
the taps the other way for dx, and reduces x·g over the head's channels for the kernel's gradient
(per program partial sums for lightconv, summed afterwards: deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from ._common import load_rows, slice_offset, store_rows


@triton.jit
def _tile(ptr, rows, columns, seq_len, width, stride):
    return load_rows(ptr, rows, columns, seq_len, width, stride, 0.0).to(tl.float32)


@triton.jit
def dynamic_tap_offset(rows, heads, head, kernel_size, tap):
    """Where W̃[rows, head, tap] lies in a (B·N, H, K) kernel: in 64 bits (B·N·H·K passes 2**31)."""
    return (tl.cast(rows, tl.int64) * heads + head) * kernel_size + tap


@triton.jit
def partial_offset(row, programs, block, kernel_size):
    """Where program (row, block)'s partial sums of a shared kernel's gradient start, in 64 bits."""
    return (tl.cast(row, tl.int64) * programs + block) * kernel_size


@triton.jit
def _taps(kernel_ptr, rows, head, tap, seq_len, heads, kernel_size, DYNAMIC: tl.constexpr):
    """W̃[·, head, tap] for output rows (dynamic: (rows,) from (B·N, H, K); else a scalar from (H, K))."""
    # One return: compiled Triton wants a single return type even where a constexpr picks the branch.
    if DYNAMIC:
        inside = (rows >= 0) & (rows < seq_len)
        taps = tl.load(kernel_ptr + dynamic_tap_offset(rows, heads, head, kernel_size, tap), inside, 0.0)[
            :, None
        ]
    else:
        taps = tl.load(kernel_ptr + head * kernel_size + tap)
    return taps


@triton.jit
def _same_segment(segment_ptr, rows, others, seq_len, PACKED: tl.constexpr):
    """Whether positions ``others`` lie in the packed segment of ``rows`` (always, unpacked)."""
    if PACKED:
        mine = tl.load(segment_ptr + rows, (rows >= 0) & (rows < seq_len), -1)
        theirs = tl.load(segment_ptr + others, (others >= 0) & (others < seq_len), -2)
        same = mine == theirs
    else:
        same = rows >= 0
    return same[:, None]


@triton.jit
def depthwise_conv_fwd_kernel(
    x_ptr, kernel_ptr, segment_ptr, out_ptr, seq_len, channels, heads, kernel_size, left,
    DYNAMIC: tl.constexpr, PACKED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    block, row = tl.program_id(0), tl.program_id(1)
    batch, head = row // heads, row % heads
    width = channels // heads
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
    columns = tl.arange(0, BLOCK_C)
    x_ptr += slice_offset(batch, seq_len, channels) + head * width
    if DYNAMIC:
        kernel_ptr += slice_offset(batch, seq_len, heads * kernel_size)
    acc = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
    for tap in range(kernel_size):
        sources = rows + tap - left
        x = _tile(x_ptr, sources, columns, seq_len, width, channels)
        x = tl.where(_same_segment(segment_ptr, rows, sources, seq_len, PACKED), x, 0.0)
        acc += _taps(kernel_ptr, rows, head, tap, seq_len, heads, kernel_size, DYNAMIC) * x
    store_rows(
        out_ptr + slice_offset(batch, seq_len, channels) + head * width,
        acc,
        rows,
        columns,
        seq_len,
        width,
        channels,
    )


@triton.jit
def depthwise_conv_bwd_kernel(
    x_ptr, kernel_ptr, segment_ptr, grad_ptr, dx_ptr, dkernel_ptr, seq_len, channels, heads, kernel_size,
    left, DYNAMIC: tl.constexpr, PACKED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dx[s] = Σ_j W̃[s−j+P, j] g[s−j+P]; dW̃[t, j] = Σ_c g[t, c] x[t+j−P, c] (lightconv: partial sums
    over this program's rows, written to dkernel[program, j])."""
    block, row = tl.program_id(0), tl.program_id(1)
    batch, head = row // heads, row % heads
    width = channels // heads
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
    columns = tl.arange(0, BLOCK_C)
    offset = slice_offset(batch, seq_len, channels) + head * width
    x_ptr, grad_ptr, dx_ptr = x_ptr + offset, grad_ptr + offset, dx_ptr + offset
    if DYNAMIC:
        kernel_ptr += slice_offset(batch, seq_len, heads * kernel_size)
        dkernel_ptr += slice_offset(batch, seq_len, heads * kernel_size)
    else:
        dkernel_ptr += partial_offset(row, tl.num_programs(0), block, kernel_size)
    grad_rows = _tile(grad_ptr, rows, columns, seq_len, width, channels)
    grad_x = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
    for tap in range(kernel_size):
        # Inputs s = rows receive from outputs t = s − tap + P.
        outputs = rows - tap + left
        grad = _tile(grad_ptr, outputs, columns, seq_len, width, channels)
        grad = tl.where(_same_segment(segment_ptr, rows, outputs, seq_len, PACKED), grad, 0.0)
        grad_x += _taps(kernel_ptr, outputs, head, tap, seq_len, heads, kernel_size, DYNAMIC) * grad
        sources = rows + tap - left
        x = _tile(x_ptr, sources, columns, seq_len, width, channels)
        x = tl.where(_same_segment(segment_ptr, rows, sources, seq_len, PACKED), x, 0.0)
        if DYNAMIC:
            inside = rows < seq_len
            target = dkernel_ptr + dynamic_tap_offset(rows, heads, head, kernel_size, tap)
            tl.store(target, tl.sum(grad_rows * x, 1), inside)
        else:
            tl.store(dkernel_ptr + tap, tl.sum(grad_rows * x))
    store_rows(dx_ptr, grad_x, rows, columns, seq_len, width, channels)


def _grid(x: torch.Tensor, heads: int) -> tuple[tuple[int, int], dict[str, int]]:
    batch, seq_len, channels = x.shape
    blocks = {"BLOCK_T": 16 if interpreting() else 64, "BLOCK_C": triton.next_power_of_2(channels // heads)}
    return (triton.cdiv(seq_len, blocks["BLOCK_T"]), batch * heads), blocks


@torch.library.custom_op("tokenmix::depthwise_conv_fwd", mutates_args=())
def depthwise_conv_fwd(
    x: torch.Tensor, kernel: torch.Tensor, heads: int, causal: bool, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """x: (B, N, C); kernel: float32 taps, (H, K) for lightconv or (B, N, H, K) for dynamic_conv;
    segments: None, or with B = 1 each position's packed segment (N,) int32 — taps never cross one.
    Returns (B, N, C) in x's dtype."""
    x, kernel = x.contiguous(), kernel.contiguous()
    kernel_size = kernel.shape[-1]
    left = kernel_size - 1 if causal else (kernel_size - 1) // 2
    out = torch.empty_like(x)
    grid, blocks = _grid(x, heads)
    depthwise_conv_fwd_kernel[grid](
        x, kernel, _segment_pointer(x, segments), out, x.shape[1], x.shape[2], heads, kernel_size, left,
        DYNAMIC=kernel.dim() == 4, PACKED=segments is not None, **blocks,
    )  # fmt: skip
    return out


def _segment_pointer(x: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """The segment ids as the kernels read them; x stands in when there are none (never read)."""
    return x if segments is None else segments.to(torch.int32).contiguous()


@depthwise_conv_fwd.register_fake
def _(x, kernel, heads, causal, segments=None):
    return torch.empty_like(x)


@torch.library.custom_op("tokenmix::depthwise_conv_bwd", mutates_args=())
def depthwise_conv_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    kernel: torch.Tensor,
    heads: int,
    causal: bool,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    x, kernel, grad_out = x.contiguous(), kernel.contiguous(), grad_out.contiguous()
    kernel_size = kernel.shape[-1]
    left = kernel_size - 1 if causal else (kernel_size - 1) // 2
    dynamic = kernel.dim() == 4
    grid, blocks = _grid(x, heads)
    grad_x = torch.empty_like(x)
    partial = torch.empty(
        kernel.shape if dynamic else (x.shape[0], heads, grid[0], kernel_size),
        device=x.device,
        dtype=torch.float32,
    )
    depthwise_conv_bwd_kernel[grid](
        x, kernel, _segment_pointer(x, segments), grad_out, grad_x, partial, x.shape[1], x.shape[2], heads,
        kernel_size, left, DYNAMIC=dynamic, PACKED=segments is not None, **blocks,
    )  # fmt: skip
    return grad_x, partial if dynamic else partial.sum((0, 2))


@depthwise_conv_bwd.register_fake
def _(grad_out, x, kernel, heads, causal, segments=None):
    return torch.empty_like(x), torch.empty_like(kernel)


def _setup_context(ctx, inputs, output):
    x, kernel, heads, causal, segments = inputs
    ctx.save_for_backward(x, kernel, segments)
    ctx.options = (heads, causal)


def _backward(ctx, grad_out):
    x, kernel, segments = ctx.saved_tensors
    grad_x, grad_kernel = depthwise_conv_bwd(grad_out, x, kernel, *ctx.options, segments)
    return grad_x, grad_kernel, None, None, None


depthwise_conv_fwd.register_autograd(_backward, setup_context=_setup_context)

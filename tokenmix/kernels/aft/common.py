"""What every AFT kernel shares: loads and stores of (rows × channels) blocks in float32, a program's
channels within its head, keys with −inf at padding, and the online joint maximum that folds scores into
(top, total, weighted) and finishes a block of rows."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import (
    exp_difference,
    load_rows,
    store_rows,
)


@triton.jit
def aft_load(ptr, rows, channels, seq_len, dim, other):
    return load_rows(ptr, rows, channels, seq_len, dim, dim, other).to(tl.float32)


@triton.jit
def aft_store(ptr, x, rows, channels, seq_len, dim):
    store_rows(ptr, x, rows, channels, seq_len, dim, dim)


@triton.jit
def aft_add(ptr, x, rows, channels, seq_len, dim):
    """Adds x into a float32 (seq_len, dim) buffer, rows and channels in range only."""
    inside = (rows[:, None] >= 0) & (rows[:, None] < seq_len) & (channels[None, :] < dim)
    tl.atomic_add(ptr + rows[:, None].to(tl.int64) * dim + channels[None, :], x, inside)


@triton.jit
def aft_channels(program, dim, head_dim, BLOCK_D: tl.constexpr):
    """The head and channels (indices into D = heads · head_dim) of a program's block; channels past the
    head's end are set to D, which every load and store leaves out."""
    blocks = tl.cdiv(head_dim, BLOCK_D)
    head = program // blocks
    within = (program % blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    return head, tl.where(within < head_dim, head * head_dim + within, dim)


@triton.jit
def aft_key_columns(head, channels, dim, key_width, KEY_PER_HEAD: tl.constexpr):
    """Columns of the keys (width D, or one per head) that the channels read."""
    if KEY_PER_HEAD:
        return tl.where(channels < dim, head, key_width)
    return channels


@triton.jit
def aft_keys(k_ptr, mask_ptr, rows, columns, seq_len, width, HAS_MASK: tl.constexpr):
    """Keys (float32) with −inf outside the sequence and at padding."""
    keys = load_rows(k_ptr, rows, columns, seq_len, width, width, float("-inf")).to(tl.float32)
    if HAS_MASK:
        real = tl.load(mask_ptr + rows, (rows < seq_len) & (rows >= 0), 0)
        keys = tl.where(real[:, None] != 0, keys, float("-inf"))
    return keys


@triton.jit
def key_offset(rows, key_width, head):
    """Where head ``head``'s key of ``rows`` lies in (N, key_width) keys, in 64 bits."""
    return tl.cast(rows, tl.int64) * key_width + head


@triton.jit
def aft_add_key_grad(
    dk_ptr, grad_k, rows, head, channels, seq_len, dim, key_width, KEY_PER_HEAD: tl.constexpr
):
    if KEY_PER_HEAD:  # a head's channels share one key
        inside = (rows >= 0) & (rows < seq_len)
        tl.atomic_add(dk_ptr + key_offset(rows, key_width, head), tl.sum(grad_k, 1), inside)
    else:
        aft_add(dk_ptr, grad_k, rows, channels, seq_len, dim)


@triton.jit
def aft_time(steps, seq_len, REVERSE: tl.constexpr):
    """Positions of scan steps: a reverse scan runs forwards over time reversed."""
    if REVERSE:
        return seq_len - 1 - steps
    return steps


@triton.jit
def aft_absorb(top, total, weighted, scores, values):
    """Folds terms e^(scores) with values into a running (max, Σ e^(s − max), Σ e^(s − max) v)."""
    new_top = tl.maximum(top, scores)
    rescale = exp_difference(top, new_top)
    weights = exp_difference(scores, new_top)
    return new_top, total * rescale + weights, weighted * rescale + weights * values


@triton.jit
def aft_finish_rows(top, total, weighted, q_ptr, out_ptr, lse_ptr, ratio_ptr, rows, channels, seq_len, dim):
    """Stores σ(q) ⊙ r, lse and r of rows from their running (max, Σ e^(s − max), Σ e^(s − max) v); a row
    with no real key outputs 0."""
    sees = (total > 0) | (total != total)  # a NaN term is seen (and says so), not "no real key"
    ratio = tl.where(sees, weighted / tl.where(sees, total, 1.0), 0.0)
    lse = tl.where(sees, top + tl.log(tl.where(sees, total, 1.0)), float("-inf"))
    queries = aft_load(q_ptr, rows, channels, seq_len, dim, 0.0)
    aft_store(out_ptr, tl.sigmoid(queries) * ratio, rows, channels, seq_len, dim)
    aft_store(lse_ptr, lse, rows, channels, seq_len, dim)
    aft_store(ratio_ptr, ratio, rows, channels, seq_len, dim)

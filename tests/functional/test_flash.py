"""mixed_chunk_attention against the float64 equation of docs/spec.md §3."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests import reference
from tests.functional.recurrent import check_pieces
from tests.functional.test_attention import TILINGS, tiling
from tests.reference import assert_matches
from tokenmix.functional import mixed_chunk_attention


def random_inputs(batch, seq_len, qk_dim, value_dim, *, seed, dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    qk = [torch.randn(batch, seq_len, qk_dim, generator=gen, dtype=torch.float64) for _ in range(4)]
    v = torch.randn(batch, seq_len, value_dim, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, seq_len, generator=gen) > 0.3
    return [t.to(dtype).requires_grad_(requires_grad) for t in (*qk, v)], mask, gen


def check(inputs, mask, gen, chunk_size, causal, tol=1e-6):
    out = mixed_chunk_attention(*inputs, chunk_size=chunk_size, causal=causal, attention_mask=mask)
    expected = reference.mixed_chunk_attention(
        *inputs, chunk_size=chunk_size, causal=causal, attention_mask=mask
    )
    rows = None if mask is None else mask[..., None].expand_as(out)
    named = dict(zip(("q_quad", "k_quad", "q_lin", "k_lin", "v"), inputs, strict=True))
    assert_matches(out, expected, named, tol, rows=rows, generator=gen, grads=inputs[0].requires_grad)


@given(
    batch=st.integers(1, 2),
    seq_len=st.integers(1, 23),
    qk_dim=st.integers(1, 6),
    value_dim=st.integers(1, 5),
    chunk_size=st.integers(1, 9),
    causal=st.booleans(),
    masked=st.booleans(),
    tiles=st.sampled_from(sorted(TILINGS)),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(batch, seq_len, qk_dim, value_dim, chunk_size, causal, masked, tiles, seed):
    inputs, mask, gen = random_inputs(batch, seq_len, qk_dim, value_dim, seed=seed, requires_grad=True)
    with tiling(tiles):
        check(inputs, mask if masked else None, gen, chunk_size, causal)


@pytest.mark.parametrize("chunk_size", [4, 5])
def test_causal_at_every_chunk_boundary(chunk_size):
    """Sequences ending just before, at and after each chunk boundary, and the boundary rows themselves."""
    for seq_len in range(chunk_size - 1, 3 * chunk_size + 2):
        inputs, mask, gen = random_inputs(2, seq_len, 3, 4, seed=seq_len, requires_grad=True)
        check(inputs, None, gen, chunk_size, causal=True)
        check(inputs, mask, gen, chunk_size, causal=True)


def test_chunk_larger_than_sequence_is_one_quadratic_chunk_plus_global_linear():
    inputs, _, gen = random_inputs(1, 7, 3, 2, seed=0)
    check(inputs, None, gen, chunk_size=64, causal=False)
    check(inputs, None, gen, chunk_size=64, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    inputs, mask, _ = random_inputs(2, 7, 3, 2, seed=1, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *x: mixed_chunk_attention(*x, chunk_size=3, causal=causal, attention_mask=mask), inputs
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision(dtype, tol):
    inputs, mask, gen = random_inputs(2, 19, 8, 6, seed=2, dtype=dtype)
    for causal in (False, True):
        out = mixed_chunk_attention(*inputs, chunk_size=4, causal=causal, attention_mask=mask)
        assert out.dtype == dtype
        check(inputs, mask, gen, 4, causal, tol)


@pytest.mark.parametrize("cuts", [[0, 13], [0, 1, 2, 6, 7, 13], [0, 4, 9, 10, 13], list(range(14))])
def test_continues_from_its_state(cuts):
    """mixed_chunk_attention in pieces from MixedChunkState (chunks finished inside a piece, pieces
    inside a chunk): each left-padded row equals its own causal op, outputs and every gradient."""
    (q_quad, k_quad, q_lin, k_lin, v), _, _ = random_inputs(3, 13, 4, 3, seed=len(cuts))

    def op(q_quad, k_quad, q_lin, k_lin, v, **state):
        return mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, chunk_size=4, causal=True, **state)

    check_pieces(op, [q_quad, k_quad, q_lin, k_lin, v], [], cuts, [13, 6, 9], 1e-10)


def test_inplace_token_steps_equal_copies():
    """inplace=True (FLASH's decoding): one-token calls without a gradient write into initial_state and
    return its tensors, with the outputs and states of the out-of-place calls — across chunk boundaries,
    with padded rows; an out-of-place call (inplace=False, or a gradient needed) leaves initial_state as
    it was."""
    inputs, mask, _ = random_inputs(3, 11, 4, 3, seed=5)
    mask[0, :3] = False

    def op(t, state, **options):
        piece = [x[:, t : t + 1] for x in inputs]
        return mixed_chunk_attention(
            *piece, chunk_size=4, causal=True, attention_mask=mask[:, t : t + 1], initial_state=state,
            output_final_state=True, **options,
        )  # fmt: skip

    def held(state):  # every tensor of a state, its positions first
        return [state.positions, *state.own_values()]

    copied = written = None
    for t in range(11):
        before = None if copied is None else [x.clone() for x in held(copied)]
        with torch.no_grad():
            expected, copied_next = op(t, copied)
            out, written_next = op(t, written, inplace=True)
        if before is not None:
            assert all(torch.equal(a, b) for a, b in zip(before, held(copied), strict=True))
            assert all(new is old for new, old in zip(held(written_next), held(written), strict=True))
            leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in held(copied)]
            leaf_state = type(copied)(*leaves[1:], positions=leaves[0])
            _, traced = op(t, leaf_state, inplace=True)  # a gradient is needed: copies
            assert all(torch.equal(a, b) for a, b in zip(before, leaves, strict=True))
            assert all(torch.equal(a, b) for a, b in zip(held(traced), held(copied_next), strict=True))
        assert torch.equal(out, expected)
        assert all(torch.equal(a, b) for a, b in zip(held(written_next), held(copied_next), strict=True))
        copied, written = copied_next, written_next


def test_state_errors_name_the_argument():
    x, v = torch.randn(1, 5, 4), torch.randn(1, 5, 3)
    _, state = mixed_chunk_attention(x, x, x, x, v, chunk_size=2, causal=True, output_final_state=True)
    with pytest.raises(ValueError, match="causal=True"):
        mixed_chunk_attention(x, x, x, x, v, chunk_size=2, output_final_state=True)
    with pytest.raises(TypeError, match="initial_state must be the MixedChunkState"):
        mixed_chunk_attention(x, x, x, x, v, chunk_size=2, causal=True, initial_state=(1,))
    with pytest.raises(ValueError, match="initial_state holds keys of shape"):
        mixed_chunk_attention(x, x, x, x, v, chunk_size=3, causal=True, initial_state=state)


def test_errors_name_the_argument():
    x, v = torch.randn(1, 5, 4), torch.randn(1, 5, 3)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        mixed_chunk_attention(x, x, x, x, v, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be a positive int"):
        mixed_chunk_attention(x, x, x, x, v, chunk_size=2.0)
    with pytest.raises(ValueError, match="k_lin has S=3"):
        mixed_chunk_attention(x, x, x, x[..., :3], v, chunk_size=2)
    with pytest.raises(ValueError, match="v has N=4"):
        mixed_chunk_attention(x, x, x, x, v[:, :4], chunk_size=2)
    with pytest.raises(ValueError, match="q_quad must have shape"):
        mixed_chunk_attention(x[0], x, x, x, v, chunk_size=2)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        mixed_chunk_attention(x, x, x, x, v, chunk_size=2, attention_mask=torch.ones(1, 4))

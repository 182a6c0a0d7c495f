"""The worked example of docs/guide.md, "Add a mixer": ``running_mean``, written the way a new mixer is
written — an op with its recurrent state, and a module that registers itself — in one file. Nothing else
in the repository names it: tests/conftest.py imports this folder before collection, and from then on it
is one of ``list_mixers()``, so every all-mixer test takes it (the module suite of docs/spec.md §6,
chunked and token-by-token decoding, packed rows, models, initialisation, the registry's checks); its
own test (test_running_mean.py) holds the op's float64 oracle.

The op: m_t = the mean of the values v_s over the real positions s ≤ t (causal) or over all real
positions (bidirectional). The mixer: y_t = W_o (σ(x_t W_g) ⊙ m_t), v = x W_v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenmix.core.checks import check_attention_mask, check_flag, check_float_tensor, check_real
from tokenmix.core.chunks import Compacted
from tokenmix.core.packing import Packing, packable
from tokenmix.core.state import DecodingState
from tokenmix.errors import InvalidValueError
from tokenmix.mixers import Mixer, register_mixer


@dataclass
class RunningMeanState(DecodingState):
    """The op's recurrent state after some positions: the sum of their real values (B, D) and their count
    (B,), both float32 at least (a bfloat16 count stops at 256). The mixer holds this state itself: a
    ``DecodingState``, so ``Mixer.step`` checks and counts it (None before the first step)."""

    total: torch.Tensor | None = None
    count: torch.Tensor | None = None


@packable(v=1)  # v's dim 1 is N: a packed row runs as its segments, each alone (docs/spec.md §8)
def running_mean(
    v: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    initial_state: RunningMeanState | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, RunningMeanState]:
    """The mean of the real values up to each position (causal) or of all of them.

    Args:
        v: (B, N, D) values.
        causal: position t averages the real positions s ≤ t (default False: all real positions).
        attention_mask: (B, N), True = real (default None: all real). Padded positions are left out of
            every mean; their own outputs are unspecified.
        initial_state: causal only — the ``RunningMeanState`` of the positions before this call
            (default None: none).
        output_final_state: causal only — also return the state after this call (default False).
        cu_seqlens: (S + 1,) cumulative segment lengths with B = 1 (default None): independent segments,
            each run alone (``packable`` adds this keyword, and ``packing``, its plan made once).

    Returns:
        (B, N, D) in v's dtype, or (that, final state) with ``output_final_state``. A position with no
        real position to average gets 0.
    """
    check_float_tensor("v", v, "(B, N, D)")
    if v.dim() != 3:
        raise InvalidValueError(f"v must have shape (B, N, D), got {tuple(v.shape)}")
    mask = check_attention_mask(attention_mask, v.shape[0], v.shape[1], v.device)
    if not check_flag("causal", causal) and (initial_state is not None or output_final_state):
        raise InvalidValueError(
            "initial_state and output_final_state continue a causal sequence: causal=True"
        )
    dtype = torch.promote_types(v.dtype, torch.float32)
    real = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device) if mask is None else mask
    # Padding is selected away, not multiplied by 0 (a NaN there stays out of every mean).
    values = torch.where(real[..., None], v.to(dtype), torch.zeros((), dtype=dtype, device=v.device))
    counts = real.to(dtype)
    fresh = initial_state is None or initial_state.empty  # a mixer's state before its first step is empty
    before = (
        initial_state
        if not fresh
        else RunningMeanState(values.new_zeros(v.shape[0], v.shape[2]), values.new_zeros(v.shape[0]))
    )
    if causal:
        total = before.total[:, None] + values.cumsum(1)
        count = before.count[:, None] + counts.cumsum(1)
    else:
        total, count = values.sum(1, keepdim=True), counts.sum(1, keepdim=True)
    out = (total / count.clamp_min(1)[..., None]).expand_as(values).to(v.dtype)
    if not output_final_state:
        return out
    return out, RunningMeanState(before.total + values.sum(1), before.count + counts.sum(1))


@register_mixer(
    "running_mean",
    paper="the worked example of docs/guide.md, 'Add a mixer' (no paper)",
    time="O(N·d²)",
    memory="O(N·d)",
    state="a sum and a count: O(d)",
)
class RunningMean(Mixer):
    """y_t = W_o (σ(x_t W_g) ⊙ mean of x_s W_v over the real s ≤ t (causal) or all real s).

    Args:
        dim: model width.
        causal: average the past only (default False).
        dropout: on the output (0).
    """

    def __init__(self, dim: int, *, causal: bool = False, dropout: float = 0.0) -> None:
        super().__init__(dim, causal=causal)
        self.to_v, self.to_gate, self.to_out = (nn.Linear(dim, dim) for _ in range(3))
        self.dropout = nn.Dropout(check_real("dropout", dropout))

    def mix_sequence(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, packing: Packing | None = None
    ) -> torch.Tensor:
        means = running_mean(self.to_v(x), causal=self.causal, attention_mask=attention_mask, packing=packing)
        return self.dropout(self.to_out(torch.sigmoid(self.to_gate(x)) * means))

    def new_state(self, batch_size: int, capacity: int | None) -> RunningMeanState:
        return RunningMeanState(batch_size=batch_size, capacity=capacity)  # the op's own, empty

    def advance(self, x: torch.Tensor, state: RunningMeanState, chunk: Compacted) -> torch.Tensor:
        # The chunk's real tokens come first in each row (chunk.valid): the op's mask leaves the rest out.
        means, final = running_mean(
            self.to_v(x), causal=True, attention_mask=chunk.valid, initial_state=state,
            output_final_state=True,
        )  # fmt: skip
        state.take(final)  # one state: the mixer's is the op's
        return self.dropout(self.to_out(torch.sigmoid(self.to_gate(x)) * means))

"""Lightweight and dynamic convolution mixers (Wu et al. 2019): ``"lightconv"`` and ``"dynamic_conv"``.

Block as in fairseq's LightConv layers: Linear(d → 2d) + GLU in (``glu=False``: Linear(d → d)), the
convolution with H heads sharing kernels across their contiguous C/H channels, softmax-normalised taps,
DropConnect on the normalised kernel while training (``weight_dropout``), Linear(d → d) out.
DynamicConv predicts each position's H×K kernel from that position's convolution input with
Linear(d → H·K).
"""

from __future__ import annotations

import torch
from torch import nn

from ..context import ops as context_ops
from ..core.checks import check_positive_int, check_real
from ..core.chunks import Compacted, last_real
from ..core.packing import Packing
from ..errors import InvalidValueError
from ..functional.conv import ConvWindowState, dynamic_conv, lightconv
from .base import Mixer
from .registry import register_mixer

PAPER = "Wu et al. 2019, Pay Less Attention with Lightweight and Dynamic Convolutions (arXiv 1901.10430)"


class ConvolutionMixer(Mixer):
    """Shared options, input projection (+ GLU), kernel normalisation and DropConnect, output projection
    and the K − 1 buffer for decoding; subclasses supply the kernel and the op.

    Args:
        dim: model width. heads: H (8). kernel_size: K (31; models take one per layer via
            ``layer_options``, e.g. the paper's 3, 7, 15, 31, 31, 31, 31).
        weight_softmax: softmax over the K taps (on). weight_dropout: DropConnect on the normalised
            kernel while training. glu: Linear(d → 2d) + GLU on the input (on). dropout: on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = False,
        heads: int = 8,
        kernel_size: int = 31,
        weight_softmax: bool = True,
        weight_dropout: float = 0.0,
        glu: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, causal=causal)
        self.heads = check_positive_int("heads", heads)
        if dim % heads:
            raise InvalidValueError(f"heads={heads} must divide dim={dim}")
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.weight_softmax = bool(weight_softmax)
        self.to_input = nn.Linear(dim, 2 * dim if glu else dim)
        self.glu = nn.GLU(dim=-1) if glu else nn.Identity()
        self.weight_dropout = nn.Dropout(check_real("weight_dropout", weight_dropout))
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(check_real("dropout", dropout))
        self.build_kernel()

    def build_kernel(self) -> None:
        """Create the parameters the kernel comes from."""
        raise NotImplementedError

    def kernel(self, u: torch.Tensor) -> torch.Tensor:
        """The raw taps for convolution input u (B, N, d): (H, K) or (B, N, H, K)."""
        raise NotImplementedError

    def mix(self, u: torch.Tensor, kernel: torch.Tensor, attention_mask: torch.Tensor | None, **state):
        """The family's op on u (B, N, d) with normalised taps; ``state``: its initial_state and
        output_final_state."""
        raise NotImplementedError

    def _normalised_kernel(self, u: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel(u)
        return self.weight_dropout(kernel.softmax(-1) if self.weight_softmax else kernel)

    def mix_sequence(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, packing: Packing | None = None
    ) -> torch.Tensor:
        u = self.glu(self.to_input(x))
        kernel = self._normalised_kernel(u)
        return self.dropout(self.to_out(self.mix(u, kernel, attention_mask, packing=packing)))

    def mix_split(self, x, attention_mask, split):
        u = self.glu(self.to_input(x))
        kernel = self._normalised_kernel(u)  # (DropConnect draws per rank: equal to one process at p = 0)
        op = context_ops.lightconv if kernel.dim() == 2 else context_ops.dynamic_conv
        y = op(u, kernel, split, causal=self.causal, weight_softmax=False, attention_mask=attention_mask)
        return self.dropout(self.to_out(y))

    def new_state(self, batch_size: int, capacity: int | None = None) -> ConvWindowState:
        """The op's state, zeros for the inputs before the sequence: constant in size; ``capacity`` only
        bounds what it may be fed."""
        window = self.to_out.weight.new_zeros(batch_size, self.kernel_size - 1, self.dim)
        return ConvWindowState(window, batch_size=batch_size, capacity=capacity)

    def advance(self, x: torch.Tensor, state: ConvWindowState, chunk: Compacted) -> torch.Tensor:
        """The causal convolution over the K − 1 previous real inputs and the chunk, in one call."""
        u = self.glu(self.to_input(x))
        window = state.inputs.to(u.dtype)
        y, final = self.mix(u, self._normalised_kernel(u), None, initial_state=state, output_final_state=True)
        # The op keeps the last K − 1 inputs, padding as 0; padding comes last in a compacted chunk, so
        # the newest real inputs end before it.
        state.inputs = (
            final.inputs
            if chunk.order is None
            else last_real(torch.cat((window, u), 1), chunk, self.kernel_size - 1)
        )
        return self.dropout(self.to_out(y))


@register_mixer(
    "lightconv",
    paper=PAPER,
    time="O(N·d·K)",
    memory="O(N·d) (grouped conv1d; O(H·N²) band matrices for short N)",
    state="last K−1 inputs, O(K·d), constant in t",
)
class LightConv(ConvolutionMixer):
    """Lightweight convolution: one learned kernel per head, shared by the head's d/H channels. Options as
    for ``ConvolutionMixer``."""

    def build_kernel(self) -> None:
        self.weight = nn.Parameter(torch.empty(self.heads, self.kernel_size))

    def init_own(self) -> None:
        nn.init.xavier_uniform_(self.weight)

    def kernel(self, u: torch.Tensor) -> torch.Tensor:
        return self.weight

    def mix(self, u, kernel, attention_mask, **state):
        return lightconv(
            u, kernel, causal=self.causal, weight_softmax=False, attention_mask=attention_mask, **state
        )


@register_mixer(
    "dynamic_conv",
    paper=PAPER,
    time="O(N·d·K + N·d·H·K)",
    memory="O(N·d) (a multiply-add per tap; O(B·H·N²) band matrices for short N)",
    state="last K−1 inputs, O(K·d), constant in t",
)
class DynamicConv(ConvolutionMixer):
    """Dynamic convolution: each position's H×K kernel is a linear function of its convolution input.
    Options as for ``ConvolutionMixer``."""

    def build_kernel(self) -> None:
        self.to_kernel = nn.Linear(self.dim, self.heads * self.kernel_size, bias=False)

    def kernel(self, u: torch.Tensor) -> torch.Tensor:
        return self.to_kernel(u).unflatten(-1, (self.heads, self.kernel_size))

    def mix(self, u, kernel, attention_mask, **state):
        return dynamic_conv(
            u, kernel, causal=self.causal, weight_softmax=False, attention_mask=attention_mask, **state
        )

"""Token models: a causal language model and an encoder classifier, both on the shared Backbone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..context.exchange import Split
from ..core.checks import check_attention_mask, check_positive_int, check_real
from ..core.packing import packing_of
from ..errors import InvalidTypeError, InvalidValueError
from ..init import SelfInitialising
from .backbone import Backbone, BackboneState


def _check_tokens(
    tokens: torch.Tensor, vocab_size: int, layout: str = "(B, N)", ndim: int = 2
) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise InvalidTypeError(
            f"tokens must be an int64/int32 tensor of shape {layout}, got {getattr(tokens, 'dtype', tokens)}"
        )
    if tokens.dim() != ndim:
        raise InvalidValueError(f"tokens must have shape {layout}, got {tuple(tokens.shape)}")
    # A value check is a host sync; a compiled graph skips it (the embedding lookup still checks).
    checked = tokens.numel() and not torch.compiler.is_compiling()
    if checked and bool((tokens.min() < 0) | (tokens.max() >= vocab_size)):  # one sync, not two
        raise InvalidValueError(
            f"tokens must lie in [0, vocab_size={vocab_size}), got values in [{tokens.min()}, {tokens.max()}]"
        )
    return tokens


class TokenEmbedding(SelfInitialising, nn.Embedding):
    """nn.Embedding drawn N(0, 0.02)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__(check_positive_int("vocab_size", vocab_size), dim)

    def init_own(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class _TokenModel(SelfInitialising):
    embedding: nn.Embedding

    @property
    def vocab_size(self) -> int:
        """The embedding's rows (so it follows a resized embedding)."""
        return self.embedding.num_embeddings


class LanguageModel(_TokenModel):
    """Causal language model: embedding → Backbone (causal) → tied output head.

    ``forward(tokens (B, N), attention_mask=None)`` returns logits (B, N, vocab_size). ``generate`` decodes
    token by token through the mixers' states. Backbone options (``mixer``, ``mixer_options``,
    ``layer_options``, ``ffn``, ``positions``, ``max_len``, ...) are passed through.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 256,
        depth: int = 4,
        mixer: str | Sequence[str] = "softmax",
        *,
        tie_weights: bool = True,
        **backbone_options: Any,
    ) -> None:
        super().__init__()
        self.embedding = TokenEmbedding(vocab_size, dim)
        self.backbone = Backbone(dim, depth, mixer, causal=True, **backbone_options)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.tie_weights = tie_weights
        self._tie()

    def _tie(self) -> None:
        if self.tie_weights:
            self.head.weight = self.embedding.weight

    def init_own(self) -> None:
        if self.tie_weights:  # the head's initialiser (a child's, so run before this) drew over it
            self.embedding.init_own()

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> LanguageModel:
        # A conversion that makes new parameters (to_empty from the meta device) makes two of the tied one.
        super()._apply(fn, recurse)
        self._tie()
        return self

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        context: Split | None = None,
    ) -> torch.Tensor:
        """tokens (B, N) → logits (B, N, vocab_size). ``cu_seqlens`` (S + 1,) with B = 1: packed
        documents, each predicted as if alone (docs/spec.md §8). ``context``: tokens (B, n) are this
        rank's share of sequences split over a context-parallel group, and so are the logits (§14)."""
        tokens = _check_tokens(tokens, self.vocab_size)
        return self.head(self.backbone(self.embedding(tokens), attention_mask, cu_seqlens, context))

    def init_state(self, batch_size: int, capacity: int | None = None) -> BackboneState:
        """An empty decoding state. ``capacity``: the most positions (padding included) it will be fed,
        for a state whose tensors keep their shapes from step to step, so that
        ``torch.compile(model.step)`` compiles once rather than per token; None lets KV caches grow."""
        return self.backbone.init_state(check_positive_int("batch_size", batch_size), capacity)

    def step(
        self, tokens: torch.Tensor, state: BackboneState, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, BackboneState]:
        """Feed ``tokens`` (B,) or a chunk (B, T) in one pass → next-token logits (B, vocab) or
        (B, T, vocab). ``attention_mask`` ((B,) or (B, T), True = real): padded positions leave the state
        unchanged and count no position (left-padded prompts of different lengths)."""
        one_or_two = isinstance(tokens, torch.Tensor) and tokens.dim() in (1, 2)
        tokens = _check_tokens(
            tokens, self.vocab_size, "(B,) or (B, T)", ndim=tokens.dim() if one_or_two else 1
        )
        hidden, state = self.backbone.step(self.embedding(tokens), state, attention_mask)
        return self.head(hidden), state

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        streamer: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Extend ``prompt`` (B, T ≥ 1) by up to ``max_new_tokens`` tokens → (B, T + n).

        The prompt is prefilled in one chunked call (``attention_mask`` (B, T): left padding for prompts
        of different lengths; each row continues from its last real token). Each new token is sampled
        from softmax(logits / temperature), restricted to the ``top_k`` most likely and to the smallest
        set whose probability reaches ``top_p``; temperature 0 (or top_k=1) is greedy. A row that emits
        ``eos_token_id`` stops, and is filled with it while the others go on; generation ends when every
        row has stopped (n < max_new_tokens then). ``streamer(tokens (B,))`` sees each new step.
        """
        prompt = _check_tokens(prompt, self.vocab_size)
        if prompt.shape[1] == 0:
            raise InvalidValueError("prompt must hold at least one token per sequence")
        max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
        temperature = check_real("temperature", temperature)
        if temperature < 0:
            raise InvalidValueError(f"temperature must be ≥ 0, got {temperature}")
        top_k = check_positive_int("top_k", top_k, allow_none=True)
        top_p = check_real("top_p", top_p, allow_none=True)
        if top_p is not None and not 0 < top_p <= 1:
            raise InvalidValueError(f"top_p must lie in (0, 1], got {top_p}")
        is_token = isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool)
        if eos_token_id is not None and not (is_token and 0 <= eos_token_id < self.vocab_size):
            raise InvalidValueError(
                f"eos_token_id must be a token in [0, {self.vocab_size}), got {eos_token_id!r}"
            )
        mask = check_attention_mask(attention_mask, prompt.shape[0], prompt.shape[1], prompt.device)
        if mask is not None and not bool(mask.any(1).all()):
            raise InvalidValueError("attention_mask must leave at least one real token in every prompt")
        state = self.init_state(prompt.shape[0])
        logits, state = self.step(prompt, state, mask)
        last = prompt.shape[1] - 1 if mask is None else mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
        logits = logits[torch.arange(prompt.shape[0], device=prompt.device), last]
        tokens = [prompt]
        finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        for index in range(max_new_tokens):
            next_token = _sample(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished = finished | (next_token == eos_token_id)
            tokens.append(next_token[:, None])
            if streamer is not None:
                streamer(next_token)
            if index == max_new_tokens - 1 or bool(finished.all()):
                break
            logits, state = self.step(next_token, state)
        return torch.cat(tokens, dim=1)


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    # Max-subtracted before the division: a tiny temperature sends the others to −inf, never inf − inf.
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p is not None and top_p < 1:
        # Nucleus: keep the most likely tokens up to and including the one that reaches top_p.
        sorted_logits, order = logits.sort(-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop = (before >= top_p).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class SequenceClassifier(_TokenModel):
    """Encoder classifier: embedding → Backbone → mean over real tokens → Linear(dim → num_classes).

    ``forward(tokens (B, N), attention_mask=None)`` returns logits (B, num_classes); with ``cu_seqlens``
    (S + 1,) and B = 1, the S packed sequences are classified each as if alone → (S, num_classes) (an
    empty one pools to zeros). Bidirectional by default; ``causal=True`` builds causal mixers. With
    ``pad_token``, tokens equal to it are padding: the mask when no ``attention_mask`` is given.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        dim: int = 256,
        depth: int = 4,
        mixer: str | Sequence[str] = "softmax",
        *,
        causal: bool = False,
        pad_token: int | None = None,
        **backbone_options: Any,
    ) -> None:
        super().__init__()
        self.embedding = TokenEmbedding(vocab_size, dim)
        self.backbone = Backbone(dim, depth, mixer, causal=causal, **backbone_options)
        self.head = nn.Linear(dim, check_positive_int("num_classes", num_classes))
        if pad_token is not None and not (isinstance(pad_token, int) and 0 <= pad_token < vocab_size):
            raise InvalidValueError(f"pad_token must be a token id in [0, {vocab_size}), got {pad_token!r}")
        self.pad_token = pad_token

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens = _check_tokens(tokens, self.vocab_size)
        if attention_mask is None and self.pad_token is not None:
            attention_mask = tokens != self.pad_token
        mask = check_attention_mask(attention_mask, tokens.shape[0], tokens.shape[1], tokens.device)
        if cu_seqlens is None:
            return self.head(masked_mean(self.backbone(self.embedding(tokens), mask), mask))
        packing = packing_of(cu_seqlens, tokens.shape[0], tokens.shape[1], mask, tokens.device)
        hidden = self.backbone(self.embedding(tokens), mask, packing=packing)  # then the mean of each segment
        segments = len(packing.lengths)
        sums = hidden.new_zeros(segments, hidden.shape[-1]).index_add(0, packing.segment_ids, hidden[0])
        counts = torch.tensor(packing.lengths, device=hidden.device).clamp_min(1).to(hidden.dtype)
        return self.head(sums / counts[:, None])


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, N, D) over the real positions of a (B, N) mask → (B, D)."""
    if mask is None:
        return hidden.mean(1)
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)

"""``TokenmixConfig`` and ``TokenmixForCausalLM``: a ``LanguageModel`` behind transformers' API."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..data.mqar import IGNORE
from ..errors import InvalidTypeError, InvalidValueError
from ..mixers.rotary import RotaryEmbedding
from ..models import LanguageModel
from ..models.backbone import BackboneState


class TokenmixConfig(PreTrainedConfig):
    """The ``LanguageModel`` arguments (see there), plus transformers' own fields."""

    model_type = "tokenmix"

    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 256,
        depth: int = 4,
        mixer: str | list[str] = "softmax",
        mixer_options: dict[str, Any] | None = None,
        layer_options: list[dict[str, Any]] | None = None,
        ffn: bool = True,
        positions: str = "learned",
        max_len: int = 1024,
        dropout: float = 0.0,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.dim = dim
        self.hidden_size = dim
        self.depth = depth
        self.num_hidden_layers = depth
        self.mixer = mixer
        self.mixer_options = dict(mixer_options or {})
        self.layer_options = layer_options
        self.ffn = ffn
        self.positions = positions
        self.max_len = max_len
        self.max_position_embeddings = max_len
        self.dropout = dropout
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def model_options(self) -> dict[str, Any]:
        """The keyword arguments of ``LanguageModel``."""
        options = {
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "depth": self.depth,
            "mixer": self.mixer,
            "mixer_options": self.mixer_options,
            "ffn": self.ffn,
            "positions": self.positions,
            "max_len": self.max_len,
            "dropout": self.dropout,
            "tie_weights": self.tie_word_embeddings,
        }
        if self.layer_options is not None:
            options["layer_options"] = self.layer_options
        return options


class TokenmixState:
    """The mixers' decoding state as ``generate``'s cache: what ``LanguageModel.init_state`` made, fed
    every position so far (padding included, each row counting its real tokens)."""

    def __init__(self, state: BackboneState, length: int) -> None:
        self.state, self.length = state, length
        self.is_linear = [True]  # no KV cache transformers should slice or mask for us

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows ``beam_idx`` (each beam continues from its parent's state)."""
        self.state = self.state.select(beam_idx)


class TokenmixForCausalLM(PreTrainedModel, GenerationMixin):
    """A ``tokenmix.models.LanguageModel`` as a transformers causal LM.

    ``forward(input_ids (B, N), attention_mask=None (B, N), labels=None, cache=None, use_cache=None)``:
    logits (B, N, vocab); ``labels`` (B, N) give the mean next-token cross-entropy (labels shifted inside,
    −100 ignored, as transformers' causal LMs do); with ``use_cache`` (``generate`` sets it) the input is
    fed to the mixers' decoding state and the state comes back as ``cache``: a prompt in one chunked call,
    then each new token. Beam search reorders the states (``TokenmixState.reorder_cache``).
    """

    config_class = TokenmixConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.head.weight": "model.embedding.weight"}

    def __init__(self, config: TokenmixConfig) -> None:
        super().__init__(config)
        self.model = LanguageModel(**config.model_options())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the mixers' own state

    def _init_weights(self, module: torch.nn.Module) -> None:
        # LanguageModel initialises its parameters itself; what transformers builds on the meta device and
        # then fills from the weights file leaves the one buffer not saved there, RoPE's frequencies.
        if isinstance(module, RotaryEmbedding):
            with torch.no_grad():
                module.init_own()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embedding

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embedding = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: TokenmixState | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        mask = None if attention_mask is None else attention_mask.bool()
        if cache is not None or use_cache:
            logits, cache = self._step(input_ids, mask, cache)
        else:
            if mask is not None and bool(mask.all()):
                mask = None
            logits = self.model(input_ids, mask)
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].masked_fill(
                torch.zeros_like(labels[:, 1:], dtype=torch.bool) if mask is None else ~mask[:, 1:], IGNORE
            )
            if not bool((shifted != IGNORE).any()):  # a mean over no target is no loss (NaN), not 0
                raise InvalidValueError(
                    f"labels {tuple(labels.shape)} leave no position to predict: every next-token label "
                    f"is {IGNORE} or padding"
                )
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _step(
        self, input_ids: torch.Tensor, mask: torch.Tensor | None, cache: TokenmixState | None
    ) -> tuple[torch.Tensor, TokenmixState]:
        if cache is not None and not isinstance(cache, TokenmixState):
            raise InvalidTypeError(
                f"cache must be the TokenmixState this model returned, got {type(cache).__name__}"
            )
        if cache is None:
            cache = TokenmixState(self.model.init_state(input_ids.shape[0]), 0)
        new = input_ids.shape[1]
        step_mask = None if mask is None else mask[:, -new:]  # transformers' mask covers every position
        logits, cache.state = self.model.step(input_ids, cache.state, step_mask)
        cache.length += new
        return logits, cache

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """transformers' ``generate``, after checking that it can continue the prompt: a token in every
        row and each row's last position real (left padding), since the next token is read there."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(prompt, torch.Tensor):
            _check_prompt(prompt, kwargs.get("attention_mask"))
        return super().generate(inputs, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: TokenmixState | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if kwargs.get("use_cache") is False:  # the whole sequence through the forward, every step
            return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        # The prompt goes in whole once, then only what the state has not seen.
        if cache is not None:
            input_ids = input_ids[:, cache.length :]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "cache": cache,
            "use_cache": True,
        }


def _check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """A prompt ``generate`` can continue: a token in every row, the last position real (left padding)."""
    if input_ids.shape[1] == 0:
        raise InvalidValueError(
            f"generate needs a prompt of at least one token, got input_ids {tuple(input_ids.shape)}"
        )
    if attention_mask is None:
        return
    real = attention_mask.bool()
    empty = (~real.any(1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidValueError(f"attention_mask: row {empty[0]} of the prompt has no real token")
    right = (~real[:, -1]).nonzero().flatten().tolist()
    if right:
        raise InvalidValueError(
            f"attention_mask: row {right[0]} of the prompt ends in padding (right padding); generate "
            "continues each row from its last position: pad on the left (tokenizer.padding_side='left')"
        )

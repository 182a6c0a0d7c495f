"""tokenmix in Hugging Face transformers (the ``tokenmix[hf]`` extra: transformers 5.x, Python ≥ 3.11).

``import tokenmix.hf`` registers ``TokenmixConfig`` (model_type ``"tokenmix"``), ``TokenmixForCausalLM``
and ``ByteTokenizer`` with ``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoTokenizer``. The model wraps a
``tokenmix.models.LanguageModel``: ``labels`` give the next-token loss, ``attention_mask`` is the padding
mask, and ``generate`` runs on the mixers' decoding states (docs/spec.md §7) — the prompt prefilled in one
call, then one token per step — held as the model's ``cache``. ``tokenmix export`` writes a directory
that ``from_pretrained`` loads.

``register_attention()`` makes tokenmix's attention functions (``"tokenmix_pointwise"``,
``"tokenmix_softmax"``, ``"tokenmix_aft_simple"``) available to every transformers model as its
``attn_implementation`` (``tokenmix.hf.attention``).
"""

from __future__ import annotations

from .attention import register_attention
from .modeling import TokenmixConfig, TokenmixForCausalLM, TokenmixState
from .tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "TokenmixConfig", "TokenmixForCausalLM", "TokenmixState", "register_attention"]


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    AutoConfig.register("tokenmix", TokenmixConfig, exist_ok=True)
    AutoModelForCausalLM.register(TokenmixConfig, TokenmixForCausalLM, exist_ok=True)
    AutoTokenizer.register(TokenmixConfig, slow_tokenizer_class=ByteTokenizer, exist_ok=True)


_register()

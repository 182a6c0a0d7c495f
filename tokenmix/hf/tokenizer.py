"""``ByteTokenizer``: tokenmix's vocabulary (the 256 byte values, token id = byte) for ``AutoTokenizer``.

Text is encoded as UTF-8 and each byte is one token, so any text round-trips; a token's string is the
Latin-1 character of its byte. Byte 0 (NUL) is the padding and end-of-text token; there is no other
special token unless one is given (``eos_token="\\n"``, say, for line-by-line generation)."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PreTrainedTokenizer


class ByteTokenizer(PreTrainedTokenizer):
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]
    PAD_ID: ClassVar[int] = 0  # NUL: padding and end of text
    vocab_files_names: ClassVar[dict[str, str]] = {}

    def __init__(
        self, pad_token: str = "\x00", eos_token: str = "\x00", padding_side: str = "left", **kwargs: Any
    ) -> None:
        # NUL, which text never holds, is also the end-of-text token: tools that need one (the
        # lm-evaluation-harness prefixes an empty context with it) find it; generate stops on it only
        # when asked (eos_token_id).
        super().__init__(pad_token=pad_token, eos_token=eos_token, padding_side=padding_side, **kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(256)}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        return ord(token) if len(token) == 1 and ord(token) < 256 else 0

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return bytes(ord(t) for t in "".join(tokens)).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the 256 byte values: nothing to write

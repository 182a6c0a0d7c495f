"""Text into model tokens (docs/spec.md §12): ``bytes`` (a token is a byte: the default, nothing to
train) and ``bpe`` (byte-level BPE trained with Hugging Face ``tokenizers``, GPT-2's pre-tokenizer).

Either way a token stands for a fixed byte string (``token_bytes``: empty for the special token), so
text round-trips and a model's loss is reported in bits per byte of text, whatever its vocabulary.
BPE reads text as UTF-8: a byte that is not UTF-8 becomes U+FFFD (three bytes) before encoding.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cache, cached_property
from pathlib import Path

import numpy as np

from ..errors import InvalidValueError, MissingFileError
from ..interrupts import interruptible

END_OF_TEXT = "<|endoftext|>"  # BPE's one special token: between documents, and before one scored alone
TOKENIZER_FILE = "tokenizer.json"
KINDS = ("bytes", "bpe")


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (``bytes_to_unicode``), inverted: what
    byte-level BPE writes in its vocabulary for each byte."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(shown), 0
    for byte in range(256):
        if byte not in shown:
            shown.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(shown, chars, strict=True)}


CUT_WINDOW = 1 << 16  # cut searches the text's last this many bytes first
_CUT_CANDIDATE = re.compile(rb"[^\t-\r ][\t-\r ]")  # a byte that is not ASCII whitespace, then one that is
# Unicode's White_Space beyond ASCII (the pre-tokenizer's \s): a character before a candidate must not be one.
_WIDE_SPACES = frozenset("\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    map(chr, range(0x2000, 0x200B))
)
MAX_TRAINED_RUN = 1024  # BPE learns from runs of non-space characters cut to at most this many
TRAINED_PART = 1 << 16  # and from texts in parts of about this many characters


def _last_cut(text: bytes, start: int, end: int) -> int:
    """The last cut (see ``BPETokenizer.cut``) in ``text[start:end]``, or 0."""
    for match in reversed(list(_CUT_CANDIDATE.finditer(text, start, end))):
        before = match.start()  # the character ending here must not be whitespace (nor undecodable)
        if text[before] < 0x80:
            if text[before] not in (0x1C, 0x1D, 0x1E, 0x1F):  # whitespace to Python: left out, to be safe
                return before + 1
            continue
        first = before
        while first > 0 and before - first < 3 and 0x80 <= text[first] < 0xC0:
            first -= 1
        character = text[first : before + 1].decode("utf-8", errors="replace")
        if len(character) == 1 and character != "\ufffd" and character not in _WIDE_SPACES:
            return before + 1
    return 0


def _training_parts(text: str) -> Iterator[str]:
    """``text`` in parts of about ``TRAINED_PART`` characters, cut before whitespace where there is some:
    the trainer pre-tokenizes each part whole with per-byte alignments (~30× its size in memory), so a
    part, not a document, bounds what learning holds beyond the word counts."""
    start = 0
    while len(text) - start > TRAINED_PART:
        end = start + TRAINED_PART
        space = max(
            text.rfind(" ", end - TRAINED_PART // 2, end), text.rfind("\n", end - TRAINED_PART // 2, end)
        )
        end = space if space > start else end
        yield from _short_runs(text[start:end])
        start = end
    yield from _short_runs(text[start:])


def _short_runs(text: str) -> Iterator[str]:
    """``text`` in parts whose runs of non-space characters are at most ``MAX_TRAINED_RUN`` long: BPE's
    trainer is quadratic in a pre-token's length (200 KB of one byte took minutes)."""
    cut = 0
    for match in re.finditer(rf"\S{{{MAX_TRAINED_RUN + 1},}}", text):
        for position in range(match.start() + MAX_TRAINED_RUN, match.end(), MAX_TRAINED_RUN):
            yield text[cut:position]
            cut = position
    yield text[cut:]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise InvalidValueError(f"vocab_size must be at most 2**32, got {vocab_size}")


class Tokenizer:
    """What tokenmix needs of a tokenizer. ``separator``: the tokens joining documents into one stream;
    ``end_of_text``: the token before a document scored alone (the harness's prefix token)."""

    kind: str
    vocab_size: int
    separator: tuple[int, ...]
    end_of_text: int

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        raise NotImplementedError

    def encode(self, text: bytes) -> np.ndarray:
        return self.encode_batch([text])[0]

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for."""
        raise NotImplementedError

    @cached_property
    def token_lengths(self) -> np.ndarray:
        """Bytes of text per token id (int64): what bits per byte divides by."""
        return np.array([len(b) for b in self.token_bytes], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> bytes:
        table = self.token_bytes
        return b"".join(table[i] for i in ids)

    def cut(self, text: bytes) -> int:
        """A position at which ``text`` can be split and encoded in two parts with the tokens of the
        whole (0 where none was found)."""
        return len(text)

    def save(self, directory: Path) -> None:
        """Write the tokenizer's files into ``directory`` (none for bytes)."""

    @property
    def fingerprint(self) -> str:
        """A hash of what decides the encodings: a dataset's manifest records it."""
        return self.kind


class ByteTokenizer(Tokenizer):
    """A token per byte (id = byte value); documents joined by a blank line, NUL before a lone one."""

    kind = "bytes"
    vocab_size = 256
    separator = (10, 10)  # b"\n\n"
    end_of_text = 0  # NUL, which text never holds

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        return [np.frombuffer(text, dtype=np.uint8) for text in texts]

    @cached_property
    def token_bytes(self) -> list[bytes]:
        return [bytes([value]) for value in range(256)]


def bpe_differences(spec: dict) -> list[str]:
    """What in a ``tokenizer.json`` (parsed) breaks what tokenmix's byte table assumes: byte-level BPE,
    ``END_OF_TEXT`` its only added token, nothing that adds, drops or rewrites text on the way in
    (normaliser, prefix space, post-processor, truncation, padding), every token fixed bytes. Empty: none."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    added = spec.get("added_tokens") or []
    found = []
    if model.get("type") != "BPE":
        found.append(f"model {model.get('type')!r} (byte-level BPE needed)")
    else:
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                found.append(f"model {key}={model[key]!r}")
        if model.get("byte_fallback"):
            found.append("model byte_fallback=True")
    if pre.get("type") != "ByteLevel":
        found.append(f"pre-tokenizer {pre.get('type')!r} (ByteLevel needed)")
    elif pre.get("add_prefix_space") or pre.get("use_regex") is False:
        prefix, regex = pre.get("add_prefix_space"), pre.get("use_regex")
        found.append(f"ByteLevel add_prefix_space={prefix}, use_regex={regex}")
    if spec.get("normalizer") is not None:
        found.append(f"normalizer {spec['normalizer'].get('type')!r}")
    post = spec.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":  # ByteLevel only trims offsets
        found.append(f"post-processor {post.get('type')!r}")
    for key in ("truncation", "padding"):
        if spec.get(key) is not None:
            found.append(key)
    if [(t.get("content"), bool(t.get("special"))) for t in added] != [(END_OF_TEXT, True)]:
        names = ", ".join(repr(t.get("content")) for t in added) or "none"
        found.append(f"added tokens {names} ({END_OF_TEXT!r}, special, alone needed)")
    vocab = model.get("vocab") if isinstance(model.get("vocab"), dict) else {}
    byte_of = _byte_of_char()
    odd = [token for token in vocab if token != END_OF_TEXT and any(c not in byte_of for c in token)]
    if odd:
        found.append(f"{len(odd)} tokens that are not byte-level (e.g. {odd[0]!r})")
    return found


class BPETokenizer(Tokenizer):
    """Byte-level BPE (a ``tokenizers.Tokenizer``) with ``END_OF_TEXT`` as its only special token.

    ``END_OF_TEXT`` is inserted by id only: written in a text, ``<|endoftext|>`` is encoded as the bytes it
    is (``encode_special_tokens``), so a corpus that mentions it keeps its documents whole."""

    kind = "bpe"

    def __init__(self, tokenizer, source: str = "the BPE tokenizer") -> None:
        differences = bpe_differences(json.loads(tokenizer.to_str()))
        if differences:
            raise InvalidValueError(
                f"{source} is not one tokenmix can read exactly: {'; '.join(differences)}; tokenmix takes "
                f"byte-level BPE as `tokenmix prepare --tokenizer bpe` trains it"
            )
        self.tokenizer = tokenizer
        tokenizer.encode_special_tokens = True  # text is text: never split at an added token's spelling
        self.vocab_size = tokenizer.get_vocab_size()
        self.end_of_text = tokenizer.token_to_id(END_OF_TEXT)
        self.separator = (self.end_of_text,)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"tokenizer file {str(path)!r} does not exist")
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises its own Exception for a malformed file
            raise InvalidValueError(f"tokenizer file {str(path)!r} could not be read ({error})") from None
        return cls(tokenizer, f"tokenizer file {str(path)!r}")

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        strings = [text.decode("utf-8", errors="replace") for text in texts]
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch_fast(strings)]

    @cached_property
    def token_bytes(self) -> list[bytes]:
        byte_of = _byte_of_char()
        table = [b""] * self.vocab_size
        special = {token.content for token in self.tokenizer.get_added_tokens_decoder().values()}
        for token, index in self.tokenizer.get_vocab(with_added_tokens=True).items():
            table[index] = b"" if token in special else bytes(byte_of[char] for char in token)
        return table

    def cut(self, text: bytes) -> int:
        # GPT-2's pre-tokenizer splits before any whitespace that follows a non-whitespace character (a
        # word, number or punctuation run never takes whitespace after it), and merges stay inside
        # pre-tokens; its pattern has no look-behind, so the part after such a cut splits as the whole
        # did from there, and the part before ends where the whole's pre-token ended. Cut at the last
        # such place: an ASCII whitespace byte after a character that is not whitespace. The tail first;
        # only if it has none, what lies before it (its first byte included: a pair may straddle).
        tail = max(0, len(text) - CUT_WINDOW)
        return _last_cut(text, tail, len(text)) or (_last_cut(text, 0, tail + 1) if tail else 0)

    def save(self, directory: Path) -> None:
        self.tokenizer.save(str(directory / TOKENIZER_FILE))

    @cached_property
    def fingerprint(self) -> str:
        canonical = json.dumps(json.loads(self.tokenizer.to_str()), sort_keys=True)
        return "bpe:" + hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def train_bpe(texts: Iterable[bytes], vocab_size: int) -> BPETokenizer:
    """Byte-level BPE of ``vocab_size`` tokens (at most: a small corpus may support fewer), the 256 bytes
    and ``END_OF_TEXT`` included, learned from ``texts``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise InvalidValueError(
            f"vocab_size must be an integer ≥ 257 (the 256 bytes and {END_OF_TEXT}), got {vocab_size!r}"
        )
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.add_special_tokens([END_OF_TEXT])
    tokenizer.encode_special_tokens = True  # learn from "<|endoftext|>" written in a text as from any text
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    strings = (part for text in texts for part in _training_parts(text.decode("utf-8", errors="replace")))
    interruptible(tokenizer.train_from_iterator, strings, trainer)  # minutes in Rust: Ctrl-C acts at once
    return BPETokenizer(tokenizer)


def load_tokenizer(kind: str, directory: Path | None = None) -> Tokenizer:
    """The tokenizer of ``kind``, a BPE one read from ``directory``'s tokenizer file."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe" and directory is not None:
        return BPETokenizer.load(directory / TOKENIZER_FILE)
    raise InvalidValueError(f"tokenizer must be one of {', '.join(KINDS)}, got {kind!r}")


__all__ = [
    "END_OF_TEXT",
    "BPETokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "token_dtype",
    "train_bpe",
]

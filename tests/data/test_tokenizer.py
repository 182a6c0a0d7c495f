"""Tokenizers: bytes and byte-level BPE round-trip any text, each token stands for fixed bytes, and a cut
where ``cut`` allows encodes as the whole."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tokenmix.data.documents import embedded_documents
from tokenmix.data.tokenizer import END_OF_TEXT, BPETokenizer, ByteTokenizer, token_dtype, train_bpe

TEXTS = [
    "Call me Ishmael. Héllo wörld — 日本語 🙂 naïve\n\nNext\u2028line\u3000ideographic space\n",
    "  two  spaces\t\ttabs\r\nCRLF\n\n\n  indented\n-dash\n\u00a0nbsp\n",
    "",
]


@pytest.fixture(scope="module")
def bpe():
    code = b"def f():\n\n    return 1\n\n\n  \n" * 200  # whitespace runs across newlines, merged
    return train_bpe([*embedded_documents()[:20], code, *(t.encode() for t in TEXTS)], 600)


def test_bpe_round_trips_any_text_through_its_token_bytes(bpe):
    assert bpe.vocab_size == 600 and bpe.token_bytes[bpe.end_of_text] == b""
    assert bpe.tokenizer.token_to_id(END_OF_TEXT) == bpe.end_of_text
    for text in TEXTS:
        ids = bpe.encode(text.encode())
        assert bpe.decode(ids) == text.encode()
        assert int(bpe.token_lengths[ids].sum()) == len(text.encode())
        assert bpe.tokenizer.decode(ids.tolist()) == text  # tokenizers' own decoder agrees
    assert len(bpe.encode(TEXTS[0].encode())) < len(TEXTS[0].encode())  # merges happened
    assert bpe.decode(bpe.encode(b"\xff\xfeabc")) == "\ufffd\ufffdabc".encode()  # not UTF-8: U+FFFD


def test_bytes_are_their_own_tokens():
    tokens = ByteTokenizer()
    data = bytes(range(256))
    assert tokens.encode(data).tolist() == list(range(256)) and tokens.decode(range(256)) == data
    assert tokens.token_lengths.tolist() == [1] * 256


def test_text_cut_where_bpe_allows_encodes_as_the_whole(bpe):
    rng = np.random.default_rng(0)
    alphabet = [*list("ab \n\t.é日-'"), "\u3000", "\xa0", "\r\n", "  ", "    ", "\n\n", "return", "кит",
                "\u2028", "\x85", "\x1c", "\x0b", "'s", "12"]  # fmt: skip
    checked = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet, int(rng.integers(2, 40)))).encode()
        cut = bpe.cut(text)
        if cut:
            whole = bpe.encode(text).tolist()
            assert bpe.encode(text[:cut]).tolist() + bpe.encode(text[cut:]).tolist() == whole, text
            checked += 1
    assert checked > 80


def test_a_cut_anywhere_else_can_change_the_tokens(bpe):
    """What ``cut`` avoids: a newline cut from the spaces after it, a space cut from its word, a word cut
    in two, a cut after Unicode whitespace."""
    for text, position in (
        (b"x\n\n    return", 2),
        (b"the whale", 6),
        (b"the whale", 4),
        (b"x\n\n    return", 5),
    ):
        whole = bpe.encode(text).tolist()
        assert bpe.encode(text[:position]).tolist() + bpe.encode(text[position:]).tolist() != whole
        assert bpe.cut(text) != position
    assert bpe.cut("日\u3000 x".encode()) == 0  # after U+3000 the space is in a whitespace run


def test_texts_without_lone_newlines_are_cut_too(bpe):
    """Issue 38.6: CRLF text, blank-line paragraphs and Cyrillic had no cut, so a document was encoded
    whole (peak memory grew with the corpus)."""
    for text in ("line one\r\nline two\r\n", "para one.\n\npara two.", "Зовите меня Измаил. Кит\n"):
        data = text.encode() * 200
        cut = bpe.cut(data)
        assert len(data) - 40 < cut < len(data)
        assert bpe.encode(data[:cut]).tolist() + bpe.encode(data[cut:]).tolist() == bpe.encode(data).tolist()
    far = b"x " + b"y" * (1 << 17)  # the only cut lies before the last window searched first
    assert bpe.cut(far) == 1


def test_bpe_learns_from_a_long_run_of_one_byte_at_once():
    """Issue 38.6: the trainer is quadratic in a pre-token's length (200 KB of one byte: > 170 s)."""
    import time

    start = time.perf_counter()
    learned = train_bpe([b"a" * 200_000, b"the whale and the sea"], 300)
    assert time.perf_counter() - start < 20
    assert learned.decode(learned.encode(b"a" * 5000)) == b"a" * 5000


def test_the_token_dtype_is_the_smallest_that_holds_the_vocabulary():
    assert [token_dtype(n).name for n in (256, 257, 65536, 65537)] == ["uint8", "uint16", "uint16", "uint32"]


def test_a_vocabulary_without_room_for_the_bytes_is_refused():
    with pytest.raises(ValueError, match="vocab_size must be an integer ≥ 257"):
        train_bpe([b"abc"], 256)


def test_the_end_of_text_written_in_a_text_is_bytes_like_any_other(bpe):
    """Issue 38.1: "<|endoftext|>" in a document is its 13 bytes, not the separator between documents."""
    text = f"GPT-2 ends a document with {END_OF_TEXT}, like{END_OF_TEXT}this.".encode()
    ids = bpe.encode(text)
    assert bpe.end_of_text not in ids.tolist()
    assert bpe.decode(ids) == text and int(bpe.token_lengths[ids].sum()) == len(text)
    assert bpe.encode_batch([text, b"x"])[0].tolist() == ids.tolist()
    learned = train_bpe([text * 50], 300)  # learning from such text leaves it text too
    assert learned.end_of_text not in learned.encode(text).tolist()


def _edited(bpe, change):
    from tokenizers import Tokenizer as HFTokenizer

    spec = json.loads(bpe.tokenizer.to_str())
    change(spec)
    return HFTokenizer.from_str(json.dumps(spec))


def _added_plain_token(spec):
    spec["added_tokens"].append({**spec["added_tokens"][0], "id": 600, "content": "zz", "special": False})


def _prefix_space(spec):
    spec["pre_tokenizer"]["add_prefix_space"] = True


def _lowercase(spec):
    spec["normalizer"] = {"type": "Lowercase"}


def _bos(spec):
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": END_OF_TEXT, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
        "special_tokens": {END_OF_TEXT: {"id": END_OF_TEXT, "ids": [0], "tokens": [END_OF_TEXT]}},
    }


def _whitespace(spec):
    spec["pre_tokenizer"] = {"type": "Whitespace"}


def _wordpiece(spec):
    spec["model"] = {
        "type": "WordPiece",
        "unk_token": END_OF_TEXT,
        "continuing_subword_prefix": "##",
        "max_input_chars_per_word": 100,
        "vocab": {END_OF_TEXT: 0, "a": 1, "##b": 2},
    }


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (_added_plain_token, "added tokens"),
        (_prefix_space, "add_prefix_space=True"),
        (_lowercase, "normalizer 'Lowercase'"),
        (_bos, "post-processor 'TemplateProcessing'"),
        (_whitespace, "pre-tokenizer 'Whitespace'"),
        (_wordpiece, "model 'WordPiece'"),
    ],
)
def test_a_tokenizer_that_would_change_the_text_is_refused_naming_what(bpe, tmp_path, change, named):
    """Issue 38.2: each of these changed the data silently or crashed with a KeyError."""
    path = tmp_path / "tokenizer.json"
    _edited(bpe, change).save(str(path))
    with pytest.raises(ValueError, match=re.escape(named)) as error:
        BPETokenizer.load(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    BPETokenizer.load(_save(bpe, tmp_path / "same.json"))  # the unedited file is read


def _save(bpe, path):
    bpe.tokenizer.save(str(path))
    return path

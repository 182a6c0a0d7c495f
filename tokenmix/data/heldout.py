"""Held-out sentences of the embedded corpus: whole sentences of its test split (never trained on by
the default charlm runs), the documents of the bundled lm-evaluation-harness tasks and of
``tokenmix eval --split heldout``."""

from __future__ import annotations

import re
from functools import cache

from .text import embedded_corpus, split

SHORTEST, LONGEST = 24, 96  # bytes; longer than a run's context, a sentence is scored in windows


@cache
def heldout_sentences() -> tuple[str, ...]:
    """ASCII sentences of 24–96 bytes and at least five words that start with a capital letter and end
    in a word of letters and . ! or ?, in corpus order, each once (whitespace collapsed to one space)."""
    text = bytes(split(embedded_corpus())["test"].numpy()).decode("utf-8", errors="ignore")
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    kept = (
        s
        for s in sentences
        if s.isascii()
        and SHORTEST <= len(s) <= LONGEST
        and len(s.split()) >= 5
        and re.fullmatch(r"[A-Z].* [A-Za-z]+[.!?]", s)
    )
    return tuple(dict.fromkeys(kept))  # each sentence once, in order


def cloze(sentence: str) -> tuple[str, str]:
    """The sentence without its last word (the context) and that word with its leading space (the
    target), as LAMBADA is scored; the closing punctuation is dropped."""
    body = sentence[:-1]
    context, word = body.rsplit(" ", 1)
    return context, " " + word


__all__ = ["cloze", "heldout_sentences"]

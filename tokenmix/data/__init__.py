"""Data that installs with the package or comes from the user's files (no downloads at run time)."""

from .text import VOCAB_SIZE, embedded_corpus, load_corpus, random_windows, split

__all__ = ["VOCAB_SIZE", "embedded_corpus", "load_corpus", "random_windows", "split"]

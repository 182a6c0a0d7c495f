"""The bundled tasks' data and scoring (loaded by lm-evaluation-harness from the task files)."""

from __future__ import annotations

from typing import Any

import datasets

from tokenmix.data.heldout import cloze, heldout_sentences


def cloze_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    rows = [dict(zip(("context", "target"), cloze(s), strict=True)) for s in heldout_sentences()]
    return {"test": datasets.Dataset.from_list(rows)}


def bpb_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    # Scored by the harness's rolling log-likelihood: every byte, the first after the end-of-text token,
    # in windows of the model's context (so any sentence fits any run).
    return {"test": datasets.Dataset.from_list([{"text": s} for s in heldout_sentences()])}


def bpb_results(doc: dict[str, str], results: list[float]) -> dict[str, tuple[float, int]]:
    """(log-likelihood, bytes) of the sentence, summed over documents by the bits_per_byte aggregation."""
    (loglikelihood,) = results
    return {"bits_per_byte": (loglikelihood, len(doc["text"].encode("utf-8")))}

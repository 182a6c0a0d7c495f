"""The bundled tasks' data and scoring (loaded by lm-evaluation-harness from the task files)."""

from __future__ import annotations

from typing import Any

import datasets

from tokenmix.data.heldout import cloze, heldout_sentences


def cloze_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    rows = [dict(zip(("context", "target"), cloze(s), strict=True)) for s in heldout_sentences()]
    return {"test": datasets.Dataset.from_list(rows)}


def bpb_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    # The first character is context only, as a document's first byte in tokenmix's evaluation.
    rows = [{"context": s[0], "target": s[1:]} for s in heldout_sentences()]
    return {"test": datasets.Dataset.from_list(rows)}


def bpb_results(doc: dict[str, str], results: list[tuple[float, bool]]) -> dict[str, tuple[float, int]]:
    """(log-likelihood, bytes) of the target, summed over documents by the bits_per_byte aggregation."""
    loglikelihood, _ = results[0]
    return {"bits_per_byte": (loglikelihood, len(doc["target"].encode("utf-8")))}

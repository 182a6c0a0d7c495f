"""Prefill on the CPU: a 1024-token prompt fed to a LanguageModel (d=128, 2 layers) as one chunk, as
token-by-token steps (what generate did before chunked steps), and as a plain forward — the issue's
measure, generate(prompt, 1) against one forward over the prompt. Batch 1, float32, no gradients.

    python benchmarks/prefill.py [--mixers softmax,aft_simple,flash] [--seq-len 1024]
"""

from __future__ import annotations

import argparse

import torch
from harness import time_ms, write_results

from tokenmix.models import LanguageModel


def measure_mixer(mixer: str, seq_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = LanguageModel(256, 128, depth=2, mixer=mixer, max_len=seq_len + 1).eval()
    prompt = torch.randint(0, 256, (1, seq_len))

    def forward() -> None:
        with torch.no_grad():
            model(prompt)

    def chunked() -> None:
        model.generate(prompt, 1, temperature=0)

    def token_by_token() -> None:
        with torch.no_grad():
            state = model.init_state(1)
            for t in range(seq_len):
                _, state = model.step(prompt[:, t], state)

    record = {"mixer": mixer, "seq_len": seq_len}
    for name, run in (
        ("forward_ms", forward),
        ("generate_1_ms", chunked),
        ("token_by_token_ms", token_by_token),
    ):
        record[name] = time_ms(run, repeats if name != "token_by_token_ms" else 1)
    record["generate_over_forward"] = record["generate_1_ms"] / record["forward_ms"]
    record["token_by_token_over_forward"] = record["token_by_token_ms"] / record["forward_ms"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mixers", default="softmax,aft_simple,flash,aft_local,lightconv")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/cpu-prefill-DATE.json)")
    args = parser.parse_args()
    records = []
    for mixer in args.mixers.split(","):
        record = measure_mixer(mixer, args.seq_len, args.repeats)
        records.append(record)
        print(
            f"{mixer:12s} forward {record['forward_ms']:8.1f} ms   generate(prompt, 1) "
            f"{record['generate_1_ms']:8.1f} ms ({record['generate_over_forward']:.2f}×)   token by token "
            f"{record['token_by_token_ms']:9.1f} ms ({record['token_by_token_over_forward']:.0f}×)"
        )
    print(f"wrote {write_results('prefill', records, args.out)}")


if __name__ == "__main__":
    main()

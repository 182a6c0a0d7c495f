"""Prefill and decoding on the CPU, LanguageModel d=128, 2 layers, batch 1, float32, no gradients.

Prefill: a prompt of each length fed as one chunk (``generate(prompt, 1)``), against one plain forward over
it (the issue's measure; target ≤ 1.5×) and, at the shortest length, token by token (what generate did
before chunked steps).

Decoding: the time per new token after a prompt of each length, eager with a growing state, eager with a
fixed-capacity state, and ``torch.compile(model.step)`` (inductor) with the fixed-capacity state — after
warm-up steps, so compilation is not counted; the number of graphs compiled over the timed steps is
recorded too (0 = no per-token recompilation).

    python benchmarks/prefill.py [--mixers softmax,aft_simple,flash] [--seq-lens 1024,4096]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo
from harness import time_ms, write_results

from tokenmix.models import LanguageModel

DECODE_STEPS = 32
WARMUP_STEPS = 4


def build(mixer: str, seq_len: int) -> LanguageModel:
    torch.manual_seed(0)
    positioned = mixer in ("aft_full", "aft_local")  # their biases need a table as long as the sequence
    options = {"max_len": seq_len + 64} if positioned else None
    return LanguageModel(256, 128, depth=2, mixer=mixer, max_len=seq_len + 64, mixer_options=options).eval()


@torch.no_grad()
def decode_ms(model: LanguageModel, prompt: torch.Tensor, capacity: int | None, compiled: bool) -> dict:
    """Milliseconds per decoded token (median over DECODE_STEPS after WARMUP_STEPS) and graphs compiled
    during the timed steps."""
    step = torch.compile(model.step) if compiled else model.step
    state = model.init_state(1, capacity)
    logits, state = model.step(prompt, state)
    token = logits[:, -1].argmax(-1)
    torch._dynamo.utils.counters.clear()
    times = []
    for index in range(WARMUP_STEPS + DECODE_STEPS):
        if index == WARMUP_STEPS:
            graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        logits, state = step(token, state)
        token = logits.argmax(-1)
        if index >= WARMUP_STEPS:
            times.append(1e3 * (time.perf_counter() - start))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    return {"ms": sorted(times)[len(times) // 2], "graphs_compiled_while_timed": graphs}


def measure_mixer(mixer: str, seq_len: int, repeats: int, token_by_token: bool) -> dict:
    model = build(mixer, seq_len)
    prompt = torch.randint(0, 256, (1, seq_len))

    def forward() -> None:
        with torch.no_grad():
            model(prompt)

    def chunked() -> None:
        model.generate(prompt, 1, temperature=0)

    def one_by_one() -> None:
        with torch.no_grad():
            state = model.init_state(1)
            for t in range(seq_len):
                _, state = model.step(prompt[:, t], state)

    record = {"mixer": mixer, "seq_len": seq_len}
    record["forward_ms"] = time_ms(forward, repeats)
    record["generate_1_ms"] = time_ms(chunked, repeats)
    record["generate_over_forward"] = record["generate_1_ms"] / record["forward_ms"]
    if token_by_token:
        record["token_by_token_ms"] = time_ms(one_by_one, 1)
        record["token_by_token_over_forward"] = record["token_by_token_ms"] / record["forward_ms"]
    capacity = seq_len + WARMUP_STEPS + DECODE_STEPS
    torch._dynamo.reset()
    for name, fixed, compiled in (
        ("decode_eager", None, False),
        ("decode_eager_fixed", capacity, False),
        ("decode_compiled_fixed", capacity, True),
    ):
        result = decode_ms(model, prompt, fixed, compiled)
        record[f"{name}_ms_per_token"] = result["ms"]
        if compiled:
            record["graphs_compiled_while_timed"] = result["graphs_compiled_while_timed"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mixers", default="softmax,aft_simple,flash,aft_local,lightconv")
    parser.add_argument("--seq-lens", default="1024,4096")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/cpu-prefill-DATE.json)")
    args = parser.parse_args()
    seq_lens = [int(n) for n in args.seq_lens.split(",")]
    records = []
    for mixer in args.mixers.split(","):
        for seq_len in seq_lens:
            record = measure_mixer(mixer, seq_len, args.repeats, token_by_token=seq_len == seq_lens[0])
            records.append(record)
            slow = record.get("token_by_token_over_forward")
            print(
                f"{mixer:12s} N={seq_len:5d} forward {record['forward_ms']:8.1f} ms  generate(prompt, 1) "
                f"{record['generate_over_forward']:.2f}×"
                + (f"  token by token {slow:.0f}×" if slow else "")
                + f"  decode ms/token: eager {record['decode_eager_ms_per_token']:.2f}, fixed "
                f"{record['decode_eager_fixed_ms_per_token']:.2f}, compiled "
                f"{record['decode_compiled_fixed_ms_per_token']:.2f} "
                f"({record['graphs_compiled_while_timed']} graphs while timed)",
                flush=True,
            )
    print(f"wrote {write_results('prefill', records, args.out)}")


if __name__ == "__main__":
    main()

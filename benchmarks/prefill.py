"""Prefill and decoding on the CPU, LanguageModel d=128, 2 layers, batch 1, float32, no gradients.

Prefill: a prompt of each length fed as one chunk (``generate(prompt, 1)``), against one plain forward over
it (the issue's measure; target ≤ 1.5×) and, at the shortest length, token by token (what generate did
before chunked steps).

Decoding: the time per new token after a prompt of each length, eager with a growing state, eager with a
fixed-capacity state, and ``torch.compile(model.step)`` (inductor) with the fixed-capacity state — after
warm-up steps, so compilation is not counted; the number of graphs compiled over the timed steps is
recorded too (0 = no per-token recompilation). Every mixer's decoders at one prompt length are timed in
one process, in alternating rounds of a few steps each (the median round is recorded), so that a drift
of the machine's speed reaches them all alike and their ratios hold.

    python benchmarks/prefill.py [--mixers softmax,aft_simple,flash] [--seq-lens 1024,4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo
from harness import time_ms, write_results

from tokenmix.models import LanguageModel

WARMUP_STEPS = 4
ROUNDS = 6
STEPS_PER_ROUND = 32
DECODERS = {  # name: (fixed capacity, compiled)
    "decode_eager": (False, False),
    "decode_eager_fixed": (True, False),
    "decode_compiled_fixed": (True, True),
}


def build(mixer: str, seq_len: int) -> LanguageModel:
    torch.manual_seed(0)
    max_len = seq_len + WARMUP_STEPS + ROUNDS * STEPS_PER_ROUND
    positioned = mixer in ("aft_full", "aft_local")  # their biases need a table as long as the sequence
    options = {"max_len": max_len} if positioned else None
    return LanguageModel(256, 128, depth=2, mixer=mixer, max_len=max_len, mixer_options=options).eval()


class Decoder:
    """One way of decoding after a prompt: its step (eager or compiled) and state, and the ms per token
    of each timed round."""

    def __init__(self, model: LanguageModel, prompt: torch.Tensor, fixed: bool, compiled: bool) -> None:
        capacity = prompt.shape[1] + WARMUP_STEPS + ROUNDS * STEPS_PER_ROUND if fixed else None
        self.step = torch.compile(model.step) if compiled else model.step
        logits, self.state = model.step(prompt, model.init_state(1, capacity))
        self.token = logits[:, -1].argmax(-1)
        self.rounds: list[float] = []

    def run(self, steps: int, timed: bool = True) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            logits, self.state = self.step(self.token, self.state)
            self.token = logits.argmax(-1)
        if timed:
            self.rounds.append(1e3 * (time.perf_counter() - start) / steps)


@torch.no_grad()
def time_decoding(models: dict[str, LanguageModel], prompt: torch.Tensor, records: dict[str, dict]) -> None:
    """Every mixer's decoders, warmed up, then timed in alternating rounds; adds ``<decoder>_ms_per_token``
    (the median round), its rounds, and the graphs compiled while timed (all mixers together)."""
    torch._dynamo.reset()
    decoders = {
        (mixer, name): Decoder(model, prompt, *how)
        for mixer, model in models.items()
        for name, how in DECODERS.items()
    }
    for decoder in decoders.values():
        decoder.run(WARMUP_STEPS, timed=False)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(ROUNDS):
        for decoder in decoders.values():
            decoder.run(STEPS_PER_ROUND)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    for (mixer, name), decoder in decoders.items():
        records[mixer][f"{name}_ms_per_token"] = statistics.median(decoder.rounds)
        records[mixer][f"{name}_rounds"] = decoder.rounds
        records[mixer]["graphs_compiled_while_timed"] = graphs


def measure_prefill(model: LanguageModel, prompt: torch.Tensor, repeats: int, token_by_token: bool) -> dict:
    def forward() -> None:
        with torch.no_grad():
            model(prompt)

    def chunked() -> None:
        model.generate(prompt, 1, temperature=0)

    def one_by_one() -> None:
        with torch.no_grad():
            state = model.init_state(1)
            for t in range(prompt.shape[1]):
                _, state = model.step(prompt[:, t], state)

    record = {"forward_ms": time_ms(forward, repeats), "generate_1_ms": time_ms(chunked, repeats)}
    record["generate_over_forward"] = record["generate_1_ms"] / record["forward_ms"]
    if token_by_token:
        record["token_by_token_ms"] = time_ms(one_by_one, 1)
        record["token_by_token_over_forward"] = record["token_by_token_ms"] / record["forward_ms"]
    return record


def measure(mixers: list[str], seq_len: int, repeats: int, token_by_token: bool) -> list[dict]:
    models = {mixer: build(mixer, seq_len) for mixer in mixers}
    prompt = torch.randint(0, 256, (1, seq_len))
    records = {
        mixer: {"mixer": mixer, "seq_len": seq_len, **measure_prefill(model, prompt, repeats, token_by_token)}
        for mixer, model in models.items()
    }
    time_decoding(models, prompt, records)
    return list(records.values())


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
    torch._dynamo.config.recompile_limit = 64  # every mixer's compiled step, one process
    records = []
    for seq_len in seq_lens:
        for record in measure(args.mixers.split(","), seq_len, args.repeats, seq_len == seq_lens[0]):
            records.append(record)
            slow = record.get("token_by_token_over_forward")
            print(
                f"{record['mixer']:12s} N={seq_len:5d} forward {record['forward_ms']:8.1f} ms  "
                f"generate(prompt, 1) {record['generate_over_forward']:.2f}×"
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

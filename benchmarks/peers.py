"""Forward+backward of each mixer beside its peer package, as ``tokenmix bench --peers`` pairs them
(x-transformers' Attention for softmax, flash-pytorch's GAU and FLASH, aft-pytorch's AFTFull and
AFTSimple, same settings), but the two in one process with calls alternated: ``tokenmix bench`` runs
each point in its own process, and on this machine two processes' speeds drift apart by up to 2×.
Causal where the peer has a causal mode; aft-pytorch has none, so AFT runs bidirectional. B = 1,
float32, the CPU.

    python benchmarks/peers.py [--seq-lens 1024,4096] [--dim 256] [--repeats 9]
"""

from __future__ import annotations

import argparse

import torch
from harness import alternated, write_results

from tokenmix.bench.runner import BIDIRECTIONAL_ONLY, PEERS, build


def compare(mixer: str, seq_len: int, dim: int, repeats: int) -> dict:
    package, cls = PEERS[mixer]
    peer = f"{package}:{cls}"
    causal = package not in BIDIRECTIONAL_ONLY
    torch.manual_seed(0)
    layers = {name: build(name, dim, seq_len, causal, {}) for name in (mixer, peer)}
    x = torch.randn(1, seq_len, dim, requires_grad=True)
    times = alternated(layers, x, repeats)
    return {
        "mixer": mixer,
        "peer": peer,
        "seq_len": seq_len,
        "dim": dim,
        "causal": causal,
        "ours_ms": times[mixer],
        "peer_ms": times[peer],
        "ours_over_peer": times[mixer] / times[peer],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mixers", default=",".join(PEERS))
    parser.add_argument("--seq-lens", default="1024,4096")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/cpu-peers-DATE.json)")
    args = parser.parse_args()
    records = []
    for mixer in args.mixers.split(","):
        for seq_len in (int(n) for n in args.seq_lens.split(",")):
            record = compare(mixer, seq_len, args.dim, args.repeats)
            records.append(record)
            print(
                f"{mixer:10s} N={seq_len:5d} {'causal' if record['causal'] else 'bidirectional':13s} "
                f"ours {record['ours_ms']:8.1f} ms  {record['peer']} {record['peer_ms']:8.1f} ms  "
                f"ours / peer {record['ours_over_peer']:.2f}",
                flush=True,
            )
    print(f"wrote {write_results('peers', records, args.out)}")


if __name__ == "__main__":
    main()

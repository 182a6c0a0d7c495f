"""AFT on the CPU: how the causal aft_local and aft_conv mixers scale (window and kernel 32, d=64; time,
live tensors and resident memory beside one N×N float32 matrix), and forward+backward of our
aft_full / aft_simple next to the peer package aft-pytorch (rish-16; `pip install tokenmix[peers]`) at
equal settings (N = 1024, d = hidden = 512, bidirectional: the peer has no causal mode).

    python benchmarks/aft.py
"""

from __future__ import annotations

import argparse
import json

from harness import alternated, measure, run_point, summary, write_results


def build(layer: str, dim: int, seq_len: int, window: int):
    from tokenmix import create_mixer

    if layer == "tokenmix-aft_local":
        return create_mixer("aft_local", dim, causal=True, window=window, max_len=seq_len)
    if layer == "tokenmix-aft_full":
        return create_mixer("aft_full", dim, max_len=seq_len, bias_rank=None)  # a full table, as the peer
    if layer == "tokenmix-aft_simple":
        return create_mixer("aft_simple", dim)
    if layer == "tokenmix-aft_conv":  # heads of 8 channels; causal, K = window keys: aft_local's band
        return create_mixer("aft_conv", dim, causal=True, heads=dim // 8, kernel_size=window)
    import aft_pytorch

    peer = {"aft-pytorch-AFTFull": aft_pytorch.AFTFull, "aft-pytorch-AFTSimple": aft_pytorch.AFTSimple}[layer]
    return peer(max_seqlen=seq_len, dim=dim, hidden_dim=dim)


def worker(point: dict) -> dict:
    import torch

    torch.manual_seed(0)
    layer = build(point["layer"], point["dim"], point["seq_len"], point["window"])
    x = torch.randn(point["batch"], point["seq_len"], point["dim"], requires_grad=True)
    grad = torch.randn_like(x)

    def run() -> None:
        layer(x).backward(grad)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return {**point, **measure(run, point["repeats"])}


def interleaved(ours: str, peer: str, seq_len: int, dim: int, batch: int, repeats: int) -> dict:
    """Both layers in one process, calls alternated (``harness.alternated``): median milliseconds of each
    over ``repeats`` rounds."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(batch, seq_len, dim, requires_grad=True)
    return alternated({name: build(name, dim, seq_len, 0) for name in (ours, peer)}, x, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--local-seq-lens", default="2048,8192")
    parser.add_argument("--local-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--peer-seq-len", type=int, default=1024)
    parser.add_argument("--peer-dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/cpu-aft-DATE.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    records = []
    local_lens = [int(n) for n in args.local_seq_lens.split(",")]
    for layer in ("tokenmix-aft_local", "tokenmix-aft_conv"):
        points = []
        for seq_len in local_lens:
            point = dict(
                layer=layer,
                seq_len=seq_len,
                dim=args.local_dim,
                window=args.window,
                batch=args.batch,
                repeats=args.repeats,
            )
            points.append(run_point(__file__, point))
            print(f"N={seq_len:6d} {layer[9:]} (causal)    {summary(points[-1])}", flush=True)
        if len(local_lens) > 1:
            growth = points[-1]["ms"] / points[0]["ms"]
            print(f"  {layer[9:]} N={local_lens[-1]} / N={local_lens[0]}: {growth:.2f} (target ≤ 6)")
        records += points
    by_layer = {}
    for layer in ("tokenmix-aft_full", "aft-pytorch-AFTFull", "tokenmix-aft_simple", "aft-pytorch-AFTSimple"):
        point = dict(
            layer=layer,
            seq_len=args.peer_seq_len,
            dim=args.peer_dim,
            window=args.window,
            batch=args.batch,
            repeats=args.repeats,
        )
        by_layer[layer] = run_point(__file__, point)
        records.append(by_layer[layer])
        print(f"N={args.peer_seq_len:6d} {layer:22s} {summary(by_layer[layer])}", flush=True)
    pairs = (("tokenmix-aft_full", "aft-pytorch-AFTFull"), ("tokenmix-aft_simple", "aft-pytorch-AFTSimple"))
    for ours, peer in pairs:
        print(f"  {ours} / {peer}: {by_layer[ours]['ms'] / by_layer[peer]['ms']:.2f} (target ≤ 1)")
        times = interleaved(ours, peer, args.peer_seq_len, args.peer_dim, args.batch, 4 * args.repeats)
        ratio = times[ours] / times[peer]
        records.append({"pass": "interleaved", "ours": ours, "peer": peer, **times, "ratio": ratio})
        print(
            f"  interleaved, one process: {times[ours]:.1f} vs {times[peer]:.1f} ms, {ratio:.2f} (target ≤ 1)"
        )
    print(f"\nwrote {write_results('aft', records, args.out)}")


if __name__ == "__main__":
    main()

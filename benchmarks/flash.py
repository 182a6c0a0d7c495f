"""Causal forward+backward of the GAU and FLASH layers, ours and the peer package flash-pytorch
(lucidrains; `pip install tokenmix[peers]`), at equal settings, on the CPU.

Each layer is timed as the peer's module computes it: LayerNorm → mixer → residual (ours: a tokenmix
Block with ffn=False). d = 256, e = 2d, s = 128, C = 256, float32. The peer's layers also add a
T5 relative-position bias that ours (following the paper's text, docs/spec.md §3) do not have; the
peer's FLASH gets rotary embeddings on 32 dims, as its FLASHTransformer does. ``--batch`` B (default 1).

    python benchmarks/flash.py                      # N = 2048, 8192
"""

from __future__ import annotations

import argparse
import json

from harness import measure, run_point, summary, write_results

LAYERS = ("tokenmix-flash", "flash-pytorch-FLASH", "tokenmix-gau", "flash-pytorch-GAU")


def build(layer: str, dim: int, chunk_size: int, qk_dim: int):
    from tokenmix import create_mixer
    from tokenmix.models import Block

    if layer.startswith("tokenmix-"):
        name = layer.removeprefix("tokenmix-")
        options = {"chunk_size": chunk_size} if name == "flash" else {}
        return Block(dim, create_mixer(name, dim, causal=True, qk_dim=qk_dim, **options), ffn=None)
    import flash_pytorch
    from rotary_embedding_torch import RotaryEmbedding

    if layer == "flash-pytorch-FLASH":
        return flash_pytorch.FLASH(
            dim=dim,
            group_size=chunk_size,
            query_key_dim=qk_dim,
            expansion_factor=2.0,
            causal=True,
            rotary_pos_emb=RotaryEmbedding(dim=min(32, qk_dim)),
        )
    return flash_pytorch.GAU(dim=dim, query_key_dim=qk_dim, expansion_factor=2.0, causal=True)


def worker(point: dict) -> dict:
    import torch

    torch.manual_seed(0)
    layer = build(point["layer"], point["dim"], point["chunk_size"], point["qk_dim"])
    x = torch.randn(point["batch"], point["seq_len"], point["dim"], requires_grad=True)
    grad = torch.randn_like(x)

    def run() -> None:
        layer(x).backward(grad)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return {**point, **measure(run, point["repeats"])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-lens", default="2048,8192")
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--qk-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/cpu-flash-DATE.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    seq_lens, layers = [int(n) for n in args.seq_lens.split(",")], args.layers.split(",")
    records = []
    for seq_len in seq_lens:
        for layer in layers:
            point = dict(
                layer=layer,
                seq_len=seq_len,
                batch=args.batch,
                dim=args.dim,
                chunk_size=args.chunk_size,
                qk_dim=args.qk_dim,
                repeats=args.repeats,
            )
            r = run_point(__file__, point)
            records.append(r)
            print(f"N={seq_len:6d} {layer:22s} {summary(r)}", flush=True)
    by_key = {(r["layer"], r["seq_len"]): r for r in records}
    print("\ntime ratios")
    for ours, peer in (("tokenmix-flash", "flash-pytorch-FLASH"), ("tokenmix-gau", "flash-pytorch-GAU")):
        for seq_len in seq_lens:
            if (ours, seq_len) in by_key and (peer, seq_len) in by_key:
                ratio = by_key[ours, seq_len]["ms"] / by_key[peer, seq_len]["ms"]
                print(f"  {ours} / {peer} at N={seq_len}: {ratio:.2f} (target ≤ 1)")
    if len(seq_lens) > 1:
        for layer in layers:
            growth = by_key[layer, seq_lens[-1]]["ms"] / by_key[layer, seq_lens[0]]["ms"]
            print(f"  {layer} N={seq_lens[-1]} / N={seq_lens[0]}: {growth:.2f}")
    print(f"\nwrote {write_results('flash', records, args.out)}")


if __name__ == "__main__":
    main()

"""The ``tokenmix`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .mixers import list_mixers, mixer_info


def _list(args: argparse.Namespace) -> int:
    infos = [mixer_info(name) for name in list_mixers()]
    if args.json:
        rows = [
            {
                "name": info.name,
                "paper": info.paper,
                "time": info.time,
                "memory": info.memory,
                "causal": True,
                "bidirectional": True,
                "decoding_state": info.state,
                "options": info.options,
            }
            for info in infos
        ]
        json.dump(rows, sys.stdout, indent=2, default=repr)
        print()
        return 0
    for info in infos:
        options = ", ".join(f"{key}={value!r}" for key, value in info.options.items())
        print(f"{info.name}")
        print(f"  paper     {info.paper}")
        print(f"  modes     bidirectional, causal (causal=True); step decoding: {info.state}")
        print(f"  cost      time {info.time}, memory {info.memory}")
        print(f"  options   {options}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    import torch

    from .models import create_model, list_presets

    for preset in list_presets():
        with torch.device("meta"):  # count parameters without allocating them
            params = sum(p.numel() for p in create_model(preset.name, args.vocab_size).parameters())
        print(f"{preset.name:18s} {params / 1e6:7.1f}M params  {preset.description}")
        if args.verbose:
            print(f"{'':18s} {preset.config}")
    return 0


def _option_value(text: str):
    """KEY=VALUE values: Python literals where they parse (3, 0.5, True, None, (4, 4)), else strings."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench, ratios

    options = {}
    for item in args.mixer_opt:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--mixer-opt expects KEY=VALUE, got {item!r}")
        options[key] = _option_value(value)
    records = bench(
        args.mixers.split(","),
        [int(n) for n in args.seq_lens.split(",")],
        dim=args.dim,
        batch=args.batch,
        passes=args.passes.split(","),
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats,
        causal=not args.bidirectional,
        options=options,
        baselines=not args.no_baselines,
        peers=args.peers,
        out=args.out,
    )
    print(f"{'mixer':22s} {'pass':8s} {'N':>7s} {'ms':>10s} {'tokens/s':>12s} {'peak MB':>9s}")
    for r in records:
        if r.get("oom"):
            print(f"{r['mixer']:22s} {r['pass']:8s} {r['seq_len']:7d} {'out of memory':>33s}")
            continue
        numbers = f"{r['ms']:10.2f} {r['tokens_per_s']:12.0f} {r['peak_mem_mb']:9.1f}"
        print(f"{r['mixer']:22s} {r['pass']:8s} {r['seq_len']:7d} {numbers}")
    for row in ratios(records):
        print(f"{row['mixer']} / {row['peer']} ({row['pass']}, N={row['seq_len']}): {row['ratio']:.2f}")
    print(f"wrote {args.out}/bench.json, time.png, memory.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmix", description="Transformer token mixers, side by side.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    list_parser = commands.add_parser(
        "list", help="every mixer: paper, options with defaults, causal/decoding support, complexity"
    )
    list_parser.add_argument("--json", action="store_true", help="machine-readable output")
    list_parser.set_defaults(run=_list)
    presets_parser = commands.add_parser(
        "presets", help="named model configurations (tokenmix.models.create_model) with parameter counts"
    )
    presets_parser.add_argument("--vocab-size", type=int, default=256)
    presets_parser.add_argument("--verbose", "-v", action="store_true", help="show each configuration")
    presets_parser.set_defaults(run=_presets)
    bench_parser = commands.add_parser("bench", help="speed and memory of mixers across sequence lengths")
    bench_parser.add_argument("--mixers", default="softmax,pointwise", help="comma-separated mixer names")
    bench_parser.add_argument("--seq-lens", default="256,1024")
    bench_parser.add_argument("--dim", type=int, default=256)
    bench_parser.add_argument("--batch", type=int, default=1)
    bench_parser.add_argument("--pass", dest="passes", default="fwd+bwd", help="some of fwd,fwd+bwd,step")
    bench_parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench_parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench_parser.add_argument("--repeats", type=int, default=5)
    bench_parser.add_argument("--bidirectional", action="store_true", help="non-causal mixers (no step pass)")
    bench_parser.add_argument("--mixer-opt", action="append", default=[], metavar="KEY=VALUE")
    bench_parser.add_argument("--no-baselines", action="store_true", help="skip the raw SDPA baseline")
    bench_parser.add_argument("--peers", action="store_true", help="add installed peer packages")
    bench_parser.add_argument("--out", default="bench-out", help="directory for bench.json and the plots")
    bench_parser.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)

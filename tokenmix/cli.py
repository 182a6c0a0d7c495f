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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)

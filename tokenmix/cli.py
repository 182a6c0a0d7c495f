"""The ``tokenmix`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InputError, InvalidTypeError, InvalidValueError, MissingFileError, UnavailableError
from .mixers import list_mixers, mixer_info
from .models.backbone import POSITIONS


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


def _lengths(flag: str, text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. ``256,1024``."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise InvalidValueError(f"{flag} expects comma-separated positive integers, got {text!r}") from None
    if any(value < 1 for value in values):
        raise InvalidValueError(f"{flag} expects comma-separated positive integers, got {text!r}")
    return values


def _mixer_options(items: Sequence[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidValueError(f"--mixer-opt expects KEY=VALUE, got {item!r}")
        options[key] = _option_value(value)
    return options


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench, ratios

    options = _mixer_options(args.mixer_opt)
    records = bench(
        args.mixers.split(","),
        _lengths("--seq-lens", args.seq_lens),
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


# Flags of `tokenmix train` that map one-to-one onto TrainConfig fields: flag -> (type, help).
_TRAIN_FLAGS = {
    "task": (
        str,
        "charlm | image-cls | image-ar | image-seq | text-cls | mqar | induction | selective-copy | listops",
    ),
    "data": (
        str,
        "charlm: a prepared dataset (tokenmix prepare), a text file, a directory or a .jsonl (default: "
        "embedded corpus); image-*: digits (default), fashion-mnist or DIR; text-cls: the npm "
        "package's directory",
    ),
    "mixer": (str, "registered mixer name (tokenmix list)"),
    "dim": (int, "model width"),
    "depth": (int, "number of blocks"),
    "positions": (str, "learned | rope | none"),
    "dropout": (float, "dropout in the FFN and after positions"),
    "seq_len": (int, "tokens per example (charlm, mqar, induction, selective-copy, listops)"),
    "patch_size": (int, "ViT patch size (image-cls)"),
    "vocab_size": (int, "vocabulary (mqar, induction, selective-copy)"),
    "num_pairs": (int, "key-value pairs per sequence (mqar)"),
    "num_tokens": (int, "the repeated segment's length (induction), the tokens to copy (selective-copy)"),
    "batch_size": (int, "global batch, split across processes and accumulation steps"),
    "grad_accum": (int, "micro-batches per optimiser step"),
    "context_parallel": (
        int,
        "split each sequence over this many torchrun processes (the rest data-parallel)",
    ),
    "steps": (int, "optimiser steps (with --time-budget: the first plan)"),
    "time_budget": (
        float,
        "seconds of training to fill (evaluations excluded): the steps are re-planned after each step at "
        "the pace so far, and the schedule follows",
    ),
    "lr": (float, "peak learning rate (AdamW)"),
    "min_lr_ratio": (float, "final learning rate / peak"),
    "warmup_steps": (int, "linear warmup steps"),
    "weight_decay": (float, "AdamW weight decay on matrices"),
    "grad_clip": (float, "gradient-norm clip (0: none)"),
    "eval_every": (int, "evaluate and checkpoint every this many steps"),
    "seed": (int, "seed of the initialisation and of the batches"),
    "device": (str, "auto | cpu | cuda"),
    "progress": (str, "auto | bar | log"),
    "log": (str, "jsonl | tensorboard (also TensorBoard event files in the run directory)"),
    "out": (str, "run directory"),
}


def _config_file(path: str) -> dict[str, Any]:
    """A run's options from a TOML or JSON file: the flags' names (``seq_len`` or ``seq-len``),
    ``mixer_options`` as a table."""
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"--config {path!r} does not exist or is not a file")
    try:
        if file.suffix == ".toml":
            import tomllib  # Python ≥ 3.11

            values = tomllib.loads(file.read_text())
        elif file.suffix == ".json":
            values = json.loads(file.read_text())
        else:
            raise InvalidValueError(f"--config {path!r} must be a .toml or .json file")
    except (ValueError, ModuleNotFoundError) as error:
        if isinstance(error, InvalidValueError):
            raise
        raise InvalidValueError(f"--config {path!r} could not be read: {error}") from None
    if not isinstance(values, dict):
        raise InvalidValueError(
            f"--config {path!r} must hold a table of options, got {type(values).__name__}"
        )
    options: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in options:  # seq_len and seq-len: which one was meant?
            raise InvalidValueError(f"--config {path!r} sets {name} twice (as {key!r} and another spelling)")
        options[name] = value
    return options


def _train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    values = _config_file(args.config) if args.config else {}  # flags given on the line override it
    values.update({name: getattr(args, name) for name in _TRAIN_FLAGS if getattr(args, name) is not None})
    if args.mixer_opt:  # merged into the file's table (which TrainConfig checks is one)
        given = values.get("mixer_options", {})
        if not isinstance(given, dict):
            raise InvalidTypeError(f"mixer_options must be a table, got {given!r} ({type(given).__name__})")
        values["mixer_options"] = {**given, **_mixer_options(args.mixer_opt)}
    if args.eval_batches is not None:
        values["eval_batches"] = (
            None if args.eval_batches == "all" else _lengths("--eval-batches", args.eval_batches)[0]
        )
    if args.no_ffn:
        values["ffn"] = False
    flags = ("compile", "resume", "pack", "fsdp", "activation_checkpointing")
    values.update({flag: True for flag in flags if getattr(args, flag)})
    records = train(TrainConfig.from_dict(values))
    if records and os.environ.get("RANK", "0") == "0":  # one summary line under torchrun
        print(json.dumps(records[-1]))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .training import evaluate

    max_batches = None if args.max_batches is None else _lengths("--max-batches", args.max_batches)[0]
    scores = evaluate(
        args.run_dir, args.split, weights=args.weights, device=args.device, max_batches=max_batches
    )
    print(json.dumps(scores))
    return 0


def _eos_byte(text: str | None) -> int | None:
    """--eos: one character of one byte (e.g. '.'), or a byte value 0–255."""
    if text is None:
        return None
    if text.isascii() and text.isdigit() and 0 <= int(text) < 256:  # ASCII digits: not '²' or '٣'
        return int(text)
    if len(text.encode()) == 1:
        return text.encode()[0]
    raise InvalidValueError(f"--eos expects one single-byte character or a byte value 0–255, got {text!r}")


def _generate(args: argparse.Namespace) -> int:
    from .training import generate

    eos = _eos_byte(args.eos)
    started = []

    def stream(text: str) -> None:  # the prompt once the run is loaded, then each byte as it comes
        if not started:  # the prompt's bytes as given (a non-UTF-8 one shown with U+FFFD)
            shown = args.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            started.append(sys.stdout.write(shown))
        sys.stdout.write(text)
        sys.stdout.flush()

    generate(
        args.run_dir,
        args.prompt,
        args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos=eos,
        seed=args.seed,
        weights=args.weights,
        device=args.device,
        stream=stream,
    )
    print()
    return 0


def _export(args: argparse.Namespace) -> int:
    try:
        from .hf.export import export_run
    except ImportError as error:
        raise UnavailableError(
            f"tokenmix export needs transformers 5 (Python ≥ 3.11): pip install 'tokenmix[hf]' ({error})"
        ) from None
    print(export_run(args.run_dir, args.out, weights=args.weights))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import time

    from .data.prepared import BPE_SAMPLE_BYTES, SHARD_TOKENS, PreparedDataset, prepare

    if args.tokenizer != "bpe" and args.vocab_size is not None:
        raise InvalidValueError("--vocab-size applies to --tokenizer bpe (bytes has 256 tokens)")
    if args.tokenizer != "bpe" and args.sample_bytes is not None:
        raise InvalidValueError(
            "--sample-bytes applies to --tokenizer bpe (the text BPE learns from); "
            f"--tokenizer {args.tokenizer} learns nothing"
        )
    start = time.perf_counter()
    out = prepare(
        args.data,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=8192 if args.vocab_size is None else args.vocab_size,
        val_fraction=args.val_fraction,
        sample_bytes=BPE_SAMPLE_BYTES if args.sample_bytes is None else args.sample_bytes,
        shard_tokens=SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
        progress=None,
    )
    manifest = PreparedDataset(out).manifest
    keys = ("tokens", "documents", "text_bytes")
    summary = {"out": str(out), **{key: manifest[key] for key in keys}, "shards": len(manifest["shards"])}
    summary["vocab_size"] = manifest["tokenizer"]["vocab_size"]
    summary["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(summary))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .bench.compare import compare

    if args.suite or args.tasks:
        return _compare_suite(args)
    compare(
        args.mixers.split(",") if args.mixers else None,
        out=args.out,
        quick=args.quick,
        device=args.device,
        seq_lens=_lengths("--seq-lens", args.seq_lens) if args.seq_lens else None,
        steps=args.steps,
        seed=args.seed,
        seeds=args.seeds,
        task=args.task,
        data=args.data,
        pack=args.pack,
        time_budget=args.time_budget,
        positions=args.positions,
    )
    return 0


# compare flags that set up one task, which a suite sets per task itself.
_ONE_TASK_FLAGS = {
    "task": "charlm",
    "data": None,
    "pack": False,
    "quick": False,
    "steps": None,
    "seq_lens": None,
}


def _compare_suite(args: argparse.Namespace) -> int:
    from .bench.suite import compare_suite

    given = [name for name, default in _ONE_TASK_FLAGS.items() if getattr(args, name) != default]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise InvalidValueError(
            f"{flags}: a suite sets each task's own; give --suite/--tasks or --task, not both"
        )
    compare_suite(
        args.mixers.split(",") if args.mixers else None,
        positions=args.positions,
        suite=args.suite or "quick",
        tasks=args.tasks.split(",") if args.tasks else None,
        out=args.out,
        device=args.device,
        seed=args.seed,
        seeds=args.seeds,
        time_budget=args.time_budget,
    )
    return 0


def _add_training_commands(commands) -> None:
    compare_parser = commands.add_parser(
        "compare", help="train and benchmark mixers side by side; writes report.md and report.html"
    )
    compare_parser.add_argument("--mixers", help="comma-separated names (default: every registered mixer)")
    compare_parser.add_argument("--quick", action="store_true", help="a small budget: < 5 min on 2 CPU cores")
    compare_parser.add_argument("--out", default="compare-out", help="report directory")
    compare_parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    compare_parser.add_argument("--seq-lens", help="benchmark lengths, e.g. 256,1024,4096")
    compare_parser.add_argument("--steps", type=int, help="training steps (overrides the budget)")
    compare_parser.add_argument("--seed", type=int, default=0, help="the first seed")
    compare_parser.add_argument(
        "--seeds",
        type=int,
        help="runs per mixer, seeds --seed, --seed + 1, ... (default: 1 with --quick, else 3)",
    )
    compare_parser.add_argument(
        "--task",
        default="charlm",
        help="one task: charlm, image-cls, image-ar, image-seq, text-cls, mqar, induction, selective-copy or "
        "listops",
    )
    compare_parser.add_argument(
        "--suite",
        choices=["quick", "full"],
        help="every mixer on the suite's tasks (recall, induction, copying, ListOps, pixels; full: + bytes)",
    )
    compare_parser.add_argument(
        "--tasks", help="comma-separated tasks of the suite (default: all; suite quick)"
    )
    compare_parser.add_argument("--data", help="the task's data, as tokenmix train --data takes it")
    compare_parser.add_argument(
        "--pack", action="store_true", help="charlm: whole documents per row (cu_seqlens)"
    )
    compare_parser.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="train every run for this long (its steps set from a timing made just before it)",
    )
    compare_parser.add_argument(
        "--positions",
        default="learned",
        choices=POSITIONS,
        help="every mixer's position scheme (default learned; rope: for the mixers that take it)",
    )
    compare_parser.set_defaults(run=_compare)
    prepare_parser = commands.add_parser(
        "prepare", help="tokenize a corpus of any size once into memory-mapped shards for --data"
    )
    prepare_parser.add_argument(
        "--data", required=True, help="a text file (.gz too), a directory (a document per file) or a .jsonl"
    )
    prepare_parser.add_argument("--out", required=True, help="the dataset directory to write")
    prepare_parser.add_argument(
        "--tokenizer",
        default="bytes",
        help="bytes, bpe (learned from --data), or a BPE tokenizer to reuse: tokenizer.json, dataset or run",
    )
    prepare_parser.add_argument(
        "--vocab-size", type=int, help="BPE vocabulary, special token included (8192)"
    )
    prepare_parser.add_argument(
        "--val-fraction", type=float, default=0.05, help="validation share of the tokens, and test's"
    )
    prepare_parser.add_argument("--sample-bytes", type=int, help="text BPE learns from (default 256 MiB)")
    prepare_parser.add_argument("--shard-tokens", type=int, help="tokens per shard file (default 2**30)")
    prepare_parser.set_defaults(run=_prepare)
    train_parser = commands.add_parser("train", help="train a model with any mixer on a task")
    for name, (kind, help_text) in _TRAIN_FLAGS.items():
        train_parser.add_argument("--" + name.replace("_", "-"), type=kind, help=help_text)
    train_parser.add_argument("--mixer-opt", action="append", default=[], metavar="KEY=VALUE")
    train_parser.add_argument("--config", help="a TOML or JSON file of these options (flags override it)")
    train_parser.add_argument("--eval-batches", help="validation batches per evaluation, or 'all'")
    train_parser.add_argument("--no-ffn", action="store_true", help="blocks without a feed-forward layer")
    train_parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    train_parser.add_argument(
        "--pack",
        action="store_true",
        help="charlm: fill each sequence with whole documents (long ones split), attention kept inside each",
    )
    train_parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    train_parser.add_argument(
        "--fsdp",
        action="store_true",
        help="shard weights, gradients and optimiser state across the torchrun processes (FSDP2)",
    )
    train_parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="keep only each block's input and recompute the block in the backward pass",
    )
    train_parser.set_defaults(run=_train)
    eval_parser = commands.add_parser(
        "eval", help="metrics of a trained run on its test split (or val, or the held-out sentences)"
    )
    eval_parser.add_argument("--run", dest="run_dir", required=True, help="run directory")
    eval_parser.add_argument("--split", default="test", choices=["test", "val", "heldout"])
    eval_parser.add_argument("--weights", default="best", choices=["best", "last"])
    eval_parser.add_argument("--device", default="auto")
    eval_parser.add_argument("--max-batches", help="at most this many batches (default: the whole split)")
    eval_parser.set_defaults(run=_eval)
    generate_parser = commands.add_parser("generate", help="continue a prompt with a trained charlm run")
    generate_parser.add_argument("--run", dest="run_dir", required=True, help="run directory")
    generate_parser.add_argument("--prompt", required=True)
    generate_parser.add_argument("--max-new-tokens", type=int, default=200)
    generate_parser.add_argument("--temperature", type=float, default=0.8)
    generate_parser.add_argument("--top-k", type=int, help="sample from the k most likely bytes")
    generate_parser.add_argument(
        "--top-p", type=float, help="sample from the smallest set reaching this mass"
    )
    generate_parser.add_argument("--greedy", action="store_true", help="the most likely byte (temperature 0)")
    generate_parser.add_argument("--eos", help="stop at this byte: one character, or a value 0–255")
    generate_parser.add_argument("--seed", type=int, default=0)
    generate_parser.add_argument("--weights", default="best", choices=["best", "last"])
    generate_parser.add_argument("--device", default="auto")
    generate_parser.set_defaults(run=_generate)
    export_parser = commands.add_parser(
        "export",
        help="a charlm run as a Hugging Face directory (AutoModelForCausalLM after import tokenmix.hf)",
    )
    export_parser.add_argument("--run", dest="run_dir", required=True, help="run directory")
    export_parser.add_argument("--out", required=True, help="a new directory to write")
    export_parser.add_argument("--weights", default="best", choices=["best", "last"])
    export_parser.set_defaults(run=_export)


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
    _add_training_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Bad input (an ``InputError``) prints one line and exits 2, writing nothing
    (``TOKENMIX_DEBUG=1`` shows its traceback); any other exception is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as error:
        if os.environ.get("TOKENMIX_DEBUG"):
            raise
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"tokenmix {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM during compare: what is finished is kept
        print(f"tokenmix {args.command}: {str(stop) or 'interrupted'}", file=sys.stderr)
        return 130

"""The Triton kernels on a GPU, in one sitting (issue 8's benchmark):

    python benchmarks/kernels_gpu.py                 # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/kernels_gpu.py --smoke --out /tmp/k.json   # tiny, on the CPU

1. Checks every kernel against the reference path on the device: outputs and gradients, bfloat16,
   ≤ 1e-2 relative error (the script stops if one fails).
2. Times forward and forward+backward in bfloat16 at N ∈ {1k, 2k, 4k, 8k, 16k} with B·N = 16k tokens and
   model width 2048 (head dim 64 → 32 heads, 128 → 16 heads, as FlashAttention's benchmark): the kernel
   (backend "triton"), our reference path (backend "reference") and PyTorch SDPA with the flash backend.
3. For the memory-bound kernels (aft_simple, lightconv, dynamic_conv) reports the bandwidth they reach —
   the bytes their kernels must read and write over the time — against the device's copy bandwidth.
4. Prints and stores each of the issue's targets as measured: the ratio, and whether it is met.

Sized for one call on a lent H100/H200 (at most 8 minutes): the timings run within ``--budget`` seconds
(300 by default; the checks, Triton's first compiles and start-up come on top), the points the targets
need first, then the rest of the kernels' sweep, then the reference path (the slowest, least needed);
each point takes as many repeats as fit in ``--point-seconds`` (at least 1, at most ``--repeats``), and
a point that no longer fits is recorded as skipped, not run.

Writes benchmarks/results/<device>-<date>.json and a plot beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenmix
from tokenmix.bench.measure import machine, time_ms, wall_clock
from tokenmix.functional import (
    aft_conv,
    aft_full,
    aft_local,
    aft_simple,
    dynamic_conv,
    lightconv,
    mixed_chunk_attention,
    pointwise_attention,
)


@dataclasses.dataclass(frozen=True)
class Shapes:
    width: int  # model width: heads × head dim, and the channels of the AFT and convolution ops
    conv_heads: int
    kernel_size: int
    window: int  # AFT-local's s
    chunk: int  # FLASH's C
    qk_dim: int  # FLASH's s


FULL = Shapes(width=2048, conv_heads=16, kernel_size=31, window=64, chunk=256, qk_dim=128)
SMOKE = Shapes(width=32, conv_heads=4, kernel_size=5, window=4, chunk=16, qk_dim=16)  # interpreter-sized


def inputs(op: str, batch: int, seq_len: int, head_dim: int, shapes: Shapes, device: str, dtype, generator):
    """The op's tensor arguments (requiring grad) and its keyword options."""

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        tensor = torch.randn(*shape, generator=generator, device=device) * scale
        return tensor.to(dtype).requires_grad_()

    width, conv_heads, kernel_size = shapes.width, shapes.conv_heads, shapes.kernel_size
    heads = width // head_dim
    if op in ("pointwise_attention", "sdpa"):
        return [randn(batch, heads, seq_len, head_dim) for _ in range(3)], {}
    if op == "mixed_chunk_attention":
        qk = [randn(batch, seq_len, shapes.qk_dim) for _ in range(4)]
        return [*qk, randn(batch, seq_len, width)], {"chunk_size": shapes.chunk}
    if op == "aft_simple":
        return [randn(batch, seq_len, width) for _ in range(3)], {}
    if op == "aft_full":
        return [*(randn(batch, seq_len, width) for _ in range(3)), randn(seq_len, seq_len, scale=0.1)], {}
    if op == "aft_local":
        qkv = [randn(batch, seq_len, width) for _ in range(3)]
        return [*qkv, randn(seq_len, seq_len, scale=0.1)], {"window": shapes.window}
    if op == "aft_conv_2d":  # the grid 16 wide, bidirectional only
        grid = (batch, seq_len // 16, 16, conv_heads, width // conv_heads)
        qkv = [randn(*grid), randn(*grid[:-1]), randn(*grid)]
        return [*qkv, randn(conv_heads, 3, 5, scale=0.1)], {}
    if op == "aft_conv":
        head_shape = (batch, seq_len, conv_heads, width // conv_heads)
        qkv = [randn(*head_shape), randn(batch, seq_len, conv_heads), randn(*head_shape)]
        return [*qkv, randn(conv_heads, kernel_size, scale=0.1)], {}
    if op == "lightconv":
        return [randn(batch, seq_len, width), randn(conv_heads, kernel_size)], {}
    if op == "dynamic_conv":
        return [randn(batch, seq_len, width), randn(batch, seq_len, conv_heads, kernel_size)], {}
    raise ValueError(op)


FUNCTIONS: dict[str, Callable] = {
    "pointwise_attention": pointwise_attention,
    "mixed_chunk_attention": mixed_chunk_attention,
    "aft_simple": aft_simple,
    "aft_full": aft_full,
    "aft_local": aft_local,
    "aft_conv": aft_conv,
    "aft_conv_2d": aft_conv,
    "lightconv": lightconv,
    "dynamic_conv": dynamic_conv,
    "sdpa": F.scaled_dot_product_attention,
}
CAUSAL_KEYWORD = {"sdpa": "is_causal"}


def call(op: str, tensors, options, causal: bool) -> torch.Tensor:
    return FUNCTIONS[op](*tensors, **options, **{CAUSAL_KEYWORD.get(op, "causal"): causal})


def check(op: str, device: str, causal: bool, seq_len: int, shapes: Shapes) -> dict:
    """Kernel vs reference in bfloat16 on small odd shapes: relative errors of out and every gradient."""
    generator = torch.Generator(device).manual_seed(0)
    head_dim = min(64, shapes.width // 2)
    tensors, options = inputs(op, 2, seq_len, head_dim, shapes, device, torch.bfloat16, generator)
    return {"op": op, "causal": causal, **_backends_agree(op, tensors, options, causal, device)}


def check_packed(op: str, args) -> dict:
    """The packed kernel vs the reference path (each document alone) on the documents the packing
    points time, causal, out and every gradient."""
    generator = torch.Generator(args.device).manual_seed(0)
    head_dim = min(64, args.shapes.width // 2)
    lengths = list(SMOKE_CHECK_DOCUMENTS) if args.smoke else None
    tensors, options, _ = documents(op, "packed", head_dim, args, generator, lengths)
    return {
        "op": op,
        "causal": True,
        "packed": True,
        **_backends_agree(op, tensors, options, True, args.device),
    }


def _backends_agree(op: str, tensors, options, causal: bool, device: str) -> dict:
    errors = {}
    results = {}
    for backend in ("reference", "triton"):
        with tokenmix.use_backend(backend):
            out = call(op, tensors, options, causal)
            upstream = torch.randn(out.shape, generator=torch.Generator(device).manual_seed(1), device=device)
            grads = torch.autograd.grad(out, tensors, upstream.to(out.dtype))
        results[backend] = [out, *grads]
    for index, (ours, want) in enumerate(zip(results["triton"], results["reference"], strict=True)):
        want = want.double()
        errors["out" if index == 0 else f"grad{index - 1}"] = float(
            (ours.double() - want).norm() / want.norm().clamp_min(1e-30)
        )
    return {"errors": errors, "ok": max(errors.values()) <= 1e-2}


# Documents of one packed step (tokens), cycled and the last cut to fit: packed into one row with
# cu_seqlens against padded to the longest, the same real tokens.
DOCUMENTS = (1536, 512, 2048, 256, 1024, 768, 128, 3072, 640, 384)
SMOKE_DOCUMENTS = (20, 7, 30, 7)
PACKED_OPS = ("pointwise_attention", "mixed_chunk_attention", "aft_simple", "lightconv")


# The packed checks' documents in a smoke run: longer than the interpreter's blocks (16 rows), so a
# segment spans several blocks and a block holds the end of one segment and the start of the next.
SMOKE_CHECK_DOCUMENTS = (37, 7, 20, 1, 17)


def document_lengths(tokens: int, smoke: bool) -> list[int]:
    lengths, total = [], 0
    for length in itertools.cycle(SMOKE_DOCUMENTS if smoke else DOCUMENTS):
        lengths.append(min(length, tokens - total))
        total += lengths[-1]
        if total == tokens:
            return lengths
    raise AssertionError("unreachable")


def documents(
    op: str, backend: str, head_dim: int, args, generator, lengths: list[int] | None = None
) -> tuple[list, dict, dict]:
    """The op's bfloat16 inputs for the documents of one step (or of ``lengths``): one packed row with
    cu_seqlens ("packed"), or a batch padded to the longest with an attention mask ("padded"); and the
    record's sizes."""
    lengths = lengths or document_lengths(args.tokens, args.smoke)
    device, shapes = args.device, args.shapes
    if backend == "packed":
        tensors, options = inputs(op, 1, sum(lengths), head_dim, shapes, device, torch.bfloat16, generator)
        bounds = torch.tensor([0, *itertools.accumulate(lengths)], device=device)
        return tensors, {**options, "cu_seqlens": bounds}, {"batch": 1, "seq_len": sum(lengths)}
    longest = max(lengths)
    tensors, options = inputs(op, len(lengths), longest, head_dim, shapes, device, torch.bfloat16, generator)
    mask = torch.arange(longest, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    return tensors, {**options, "attention_mask": mask}, {"batch": len(lengths), "seq_len": longest}


def timed(op: str, backend: str, seq_len: int, head_dim: int, causal: bool, args, deadline: float) -> dict:
    device, dtype = args.device, torch.bfloat16
    generator = torch.Generator(device).manual_seed(0)
    if backend in ("packed", "padded"):  # the kernels on documents, with or without packing
        tensors, options, sizes = documents(op, backend, head_dim, args, generator)
        batch, seq_len = sizes["batch"], sizes["seq_len"]
    else:
        batch = max(1, args.tokens // seq_len)
        tensors, options = inputs(op, batch, seq_len, head_dim, args.shapes, device, dtype, generator)
    record = {"op": op, "backend": backend, "seq_len": seq_len, "batch": batch, "head_dim": head_dim}
    record["width"] = args.shapes.width
    record["causal"] = causal
    try:
        with tokenmix.use_backend(
            {"sdpa": "reference", "packed": "triton", "padded": "triton"}.get(backend, backend)
        ):
            if op == "sdpa":
                with torch.nn.attention.sdpa_kernel(_flash_backends(device)):
                    return {**record, **_time(op, tensors, options, causal, args, deadline)}
            return {**record, **_time(op, tensors, options, causal, args, deadline)}
    except torch.OutOfMemoryError:
        return {**record, "oom": True}


def _flash_backends(device: str):
    backends = torch.nn.attention.SDPBackend
    return [backends.FLASH_ATTENTION] if device == "cuda" else [backends.MATH]


def _time(op, tensors, options, causal, args, deadline: float) -> dict:
    device = torch.device(args.device)
    grad = None

    def forward() -> None:
        with torch.no_grad():
            call(op, tensors, options, causal)

    def forward_backward() -> None:
        nonlocal grad
        out = call(op, tensors, options, causal)
        grad = torch.ones_like(out) if grad is None else grad
        out.backward(grad)
        for tensor in tensors:
            tensor.grad = None

    result = {}
    for name, run in (("fwd_ms", forward), ("fwd_bwd_ms", forward_backward)):
        ms = _budgeted_ms(run, device, args, deadline)
        if ms is None:
            return {**result, "skipped": "budget"}
        result[name] = ms
    return result


def _budgeted_ms(run: Callable[[], None], device: torch.device, args, deadline: float) -> float | None:
    """Median milliseconds after a warm-up call (Triton compiles there): as many timed calls as fit in
    ``args.point_seconds`` and before ``deadline``, 1 to ``args.repeats``; None when not even the warm-up
    and one call fit."""
    if time.monotonic() >= deadline:
        return None
    if not args.smoke:  # a smoke run's timings mean nothing: it only has to go through
        run()  # warm-up
    first = wall_clock(run, device)
    left = min(args.point_seconds, deadline - time.monotonic())
    if left < 0:
        return None
    repeats = max(0, min(args.repeats - 1, int(left / max(first, 1e-6))))
    return 1000 * statistics.median([first, *(wall_clock(run, device) for _ in range(repeats))])


def minimal_bytes(op: str, record: dict, shapes: Shapes) -> int | None:
    """Bytes a forward pass must move at the least: inputs read once, outputs (and saved state) written."""
    tokens, width = record["batch"] * record["seq_len"], record["width"]
    if op == "aft_simple":  # q, k, v in; out (bf16) and lse, r (float32) out
        return tokens * width * (4 * 2 + 2 * 4)
    if op == "lightconv":
        return tokens * width * 2 * 2
    if op == "dynamic_conv":  # plus the float32 taps of every position
        return tokens * (width * 2 * 2 + shapes.conv_heads * shapes.kernel_size * 4)
    return None


ATTENTION_POINTS = (("sdpa", "sdpa"), ("pointwise_attention", "triton"), ("pointwise_attention", "reference"))


def plan(
    kernels: list[str], seq_lens: list[int], head_dims: list[int], smoke: bool, long: int, flash_len: int
):
    """Every timing as (op, backend, N, head dim, causal), in the order they run: what the targets need
    (pointwise attention and SDPA at N ≥ ``long``, FLASH causal at ``flash_len``, the memory-bound
    forwards), then the kernels' other points, then the reference path; shorter N first in each."""
    points = []
    for seq_len in seq_lens:
        for causal in (True,) if smoke else (False, True):
            for head_dim in head_dims:
                for op, backend in ATTENTION_POINTS:
                    points.append((op, backend, seq_len, head_dim, causal))
            for op in kernels[1:]:
                if op == "aft_full" and seq_len > 4096 and not smoke:
                    continue  # O(N²·D) with no matmul: minutes per point
                points += [
                    (op, backend, seq_len, head_dims[0], causal) for backend in ("triton", "reference")
                ]
    for op in PACKED_OPS:  # documents packed against padded (N: the tokens of a step)
        points += [(op, backend, 0, head_dims[0], True) for backend in ("packed", "padded")]

    def priority(point) -> int:
        op, backend, seq_len, _, causal = point
        if backend == "reference":
            return 2
        needed = (
            (op in ("sdpa", "pointwise_attention") and seq_len >= long)
            or (op == "mixed_chunk_attention" and causal and seq_len == flash_len)
            or op in ("aft_simple", "lightconv", "dynamic_conv")
        )
        return 0 if needed else 1

    return sorted(points, key=priority)  # stable: N ascending within each


def packing(records: list[dict]) -> list[dict]:
    """Per op, padded over packed forward+backward milliseconds on the same documents."""
    timed = {(r["op"], r["backend"]): r for r in records if "fwd_bwd_ms" in r}
    return [
        {
            "op": op,
            "padded_over_packed": timed[op, "padded"]["fwd_bwd_ms"] / timed[op, "packed"]["fwd_bwd_ms"],
        }
        for op in PACKED_OPS
        if (op, "packed") in timed and (op, "padded") in timed
    ]


def targets(records: list[dict], long: int, flash_len: int) -> list[dict]:
    """The issue's targets as measured: pointwise attention fwd+bwd vs SDPA-flash at N ≥ ``long`` (≥ 1,
    aim 1.3), FLASH causal fwd+bwd vs SDPA at N = ``flash_len`` (≥ 3), memory-bound forwards at ≥ 70 % of
    the copy bandwidth."""

    def sdpa(record: dict, head_dim: int) -> dict | None:
        for other in records:
            same = (other["seq_len"], other["causal"], other["head_dim"]) == (
                record["seq_len"],
                record["causal"],
                head_dim,
            )
            if other["op"] == "sdpa" and same and not other.get("oom"):
                return other
        return None

    rows = []
    for record in records:
        if record["backend"] != "triton" or record.get("oom"):
            continue
        where = {key: record[key] for key in ("op", "seq_len", "causal", "head_dim")}
        if record["op"] == "pointwise_attention" and record["seq_len"] >= long:
            baseline = sdpa(record, record["head_dim"])
            if baseline:
                speedup = baseline["fwd_bwd_ms"] / record["fwd_bwd_ms"]
                rows.append({**where, "target": "fwd+bwd speedup over SDPA-flash ≥ 1 (aim 1.3)",
                             "value": speedup, "met": speedup >= 1.0})  # fmt: skip
        if record["op"] == "mixed_chunk_attention" and record["causal"] and record["seq_len"] == flash_len:
            for head_dim in sorted({r["head_dim"] for r in records if r["op"] == "sdpa"}):
                baseline = sdpa(record, head_dim)
                if baseline:
                    speedup = baseline["fwd_bwd_ms"] / record["fwd_bwd_ms"]
                    rows.append({**where, "sdpa_head_dim": head_dim, "value": speedup, "met": speedup >= 3.0,
                                 "target": "causal fwd+bwd speedup over SDPA-flash ≥ 3"})  # fmt: skip
        if "fraction_of_copy_bandwidth" in record:
            fraction = record["fraction_of_copy_bandwidth"]
            rows.append({**where, "target": "forward at ≥ 70 % of copy bandwidth", "value": fraction,
                         "met": fraction >= 0.7})  # fmt: skip
    return rows


def copy_bandwidth(device: str) -> float:
    """GB/s of a large device-to-device copy (read + write)."""
    source = torch.empty(2**28 if device == "cuda" else 2**22, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), 10, torch.device(device))
    return 2 * source.numel() / (ms / 1000) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, TRITON_INTERPRET=1)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/<device>-<date>.json)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the timings (default 300)")
    parser.add_argument("--point-seconds", type=float, default=3.0, help="seconds of repeats per timing")
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    seq_lens = [32] if args.smoke else [1024, 2048, 4096, 8192, 16384]
    head_dims = [32] if args.smoke else [64, 128]
    args.tokens = 32 if args.smoke else 16384  # a smoke point is one row (the interpreter is slow)
    args.repeats = 1 if args.smoke else args.repeats
    kernels = [
        "pointwise_attention",
        "mixed_chunk_attention",
        "aft_simple",
        "aft_full",
        "aft_local",
        "aft_conv",
        "lightconv",
        "dynamic_conv",
    ]

    args.shapes = SMOKE if args.smoke else FULL
    check_len = 21 if args.smoke else 300
    checks = [
        check(
            op, args.device, causal, check_len if op != "aft_conv_2d" else 16 * (check_len // 16), args.shapes
        )
        for op in (*kernels, "aft_conv_2d")
        # A smoke run only has to go through each check (tests/kernels test both directions).
        for causal in ((False,) if op == "aft_conv_2d" else (True,) if args.smoke else (False, True))
    ]
    checks += [check_packed(op, args) for op in PACKED_OPS if op in kernels]
    for result in checks:
        kind = "packed " if result.get("packed") else ""
        print(
            f"check {result['op']:22s} causal={result['causal']!s:5s} {kind}"
            + " ".join(f"{name} {error:.1e}" for name, error in result["errors"].items()),
            flush=True,
        )
    if not all(result["ok"] for result in checks) and not args.smoke:
        raise SystemExit("a kernel disagrees with the reference path; not timing")

    records = []
    bandwidth = copy_bandwidth(args.device)
    deadline = time.monotonic() + args.budget
    long, flash_len = (32, 32) if args.smoke else (2048, 8192)
    for op, backend, seq_len, head_dim, causal in plan(
        kernels, seq_lens, head_dims, args.smoke, long, flash_len
    ):
        record = timed(op, backend, seq_len, head_dim, causal, args, deadline)
        needed = minimal_bytes(op, record, args.shapes)
        if needed and backend == "triton" and "fwd_ms" in record:
            record["fwd_gb_per_s"] = needed / (record["fwd_ms"] / 1000) / 1e9
            record["fraction_of_copy_bandwidth"] = record["fwd_gb_per_s"] / bandwidth
        records.append(record)
    skipped = sum("skipped" in record for record in records)
    print(
        f"timed {len(records) - skipped} points, skipped {skipped} (budget {args.budget:.0f} s)", flush=True
    )
    records = [record for record in records if "skipped" not in record] + [
        record for record in records if "skipped" in record
    ]
    measured = targets([r for r in records if "skipped" not in r], long=long, flash_len=flash_len)
    packed = packing(records)
    for row in packed:
        print(f"packing {row['op']:22s} padded / packed fwd+bwd: {row['padded_over_packed']:.2f}")
    for row in measured:
        print(
            f"target {row['op']:22s} N={row['seq_len']:<6d} causal={row['causal']!s:5s} "
            f"{row['target']}: {row['value']:.2f} {'met' if row['met'] else 'NOT met'}"
        )
    info = machine(torch.device(args.device))
    name = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    path = Path(args.out or f"benchmarks/results/{name}-{datetime.date.today()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "machine": info,
                "shapes": dataclasses.asdict(args.shapes),
                "copy_gb_per_s": bandwidth,
                "checks": checks,
                "records": records,
                "targets": measured,
                "packing": packed,
            },
            indent=2,
        )
    )
    plot(records, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, causal in zip(axes, (False, True), strict=True):
        lines: dict[str, list] = {}
        for r in records:
            timed = "fwd_bwd_ms" in r and r["backend"] not in ("packed", "padded")  # not skipped, per N
            if timed and r["causal"] == causal and r["head_dim"] == records[0]["head_dim"]:
                lines.setdefault(f"{r['op']} ({r['backend']})", []).append((r["seq_len"], r["fwd_bwd_ms"]))
        for label, points in lines.items():
            axis.plot(*zip(*sorted(points), strict=True), marker="o", label=label)
        axis.set(xscale="log", yscale="log", xlabel="N", ylabel="fwd+bwd ms (B·N fixed)")
        axis.set_title("causal" if causal else "bidirectional")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()

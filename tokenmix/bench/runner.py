"""``tokenmix bench``: speed and memory of mixers across sequence lengths.

Every point (mixer, length, pass) runs in a process of its own, forked from one worker interpreter that
has imported torch and tokenmix once (``python -m tokenmix.bench.worker``), so its memory figures are its
own and an out-of-memory point is recorded, not a crash, without an interpreter's start per point.
Baselines in the same run: raw PyTorch SDPA (``"sdpa"``) and, with ``peers=True`` when installed, the peer
packages x-transformers (softmax), flash-pytorch (gau, flash) and aft-pytorch (aft_full, aft_simple).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.checks import check_positive_int
from ..errors import InvalidValueError
from ..mixers import create_mixer, list_mixers, mixer_info
from .measure import machine, measure

PASSES = ("fwd", "fwd+bwd", "step")
BASELINES = ("sdpa",)
# Our mixer → (peer package, its class), compared at matched settings.
PEERS = {
    "softmax": ("x_transformers", "Attention"),
    "gau": ("flash_pytorch", "GAU"),
    "flash": ("flash_pytorch", "FLASH"),
    "aft_full": ("aft_pytorch", "AFTFull"),
    "aft_simple": ("aft_pytorch", "AFTSimple"),
}
BIDIRECTIONAL_ONLY = {"aft_pytorch"}  # peers without a causal mode join bidirectional runs only


class SDPABaseline(nn.Module):
    """PyTorch SDPA over heads of 64 channels (the flash backend on CUDA), without projections."""

    def __init__(self, dim: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = max(1, dim // 64), causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(q, q, q, is_causal=self.causal)
        return out.transpose(1, 2).flatten(-2)


def build(layer: str, dim: int, seq_len: int, causal: bool, options: dict[str, Any]) -> nn.Module:
    """A benchmark layer: a registered mixer, ``"sdpa"``, or ``"<package>:<class>"`` of a peer."""
    if layer == "sdpa":
        return SDPABaseline(dim, causal)
    if ":" in layer:
        package, cls = layer.split(":")
        module = __import__(package)
        if cls == "GAU":
            return module.GAU(dim=dim, causal=causal, add_residual=False)
        if cls == "FLASH":
            return module.FLASH(dim=dim, causal=causal)
        if cls == "Attention":  # our softmax defaults: 8 heads of dim/8, through SDPA (flash=True)
            return module.Attention(dim=dim, heads=8, dim_head=dim // 8, causal=causal, flash=True)
        return getattr(module, cls)(max_seqlen=seq_len, dim=dim, hidden_dim=dim)
    options = dict(options)
    if "max_len" in mixer_info(layer).options:  # room for the timed decoding steps past seq_len too
        options.setdefault("max_len", seq_len + 64)
    return create_mixer(layer, dim, causal=causal, **options)


def run_point(point: dict) -> dict:
    """Measure one point in this process; an out-of-memory error is recorded as ``oom``."""
    device, dtype = torch.device(point["device"]), getattr(torch, point["dtype"])
    torch.manual_seed(0)
    record = {key: point[key] for key in ("mixer", "seq_len", "pass", "device", "dtype", "batch", "dim")}
    try:
        layer = build(point["mixer"], point["dim"], point["seq_len"], point["causal"], point["options"])
        layer = layer.to(device=device, dtype=dtype)
        x = torch.randn(point["batch"], point["seq_len"], point["dim"], device=device, dtype=dtype)
        tokens = point["batch"] * point["seq_len"]
        if point["pass"] == "fwd":

            def run() -> None:
                with torch.no_grad():
                    layer(x)

        elif point["pass"] == "fwd+bwd":
            x.requires_grad_(True)
            grad = torch.randn_like(x)

            def run() -> None:
                layer(x).backward(grad)
                layer.zero_grad(set_to_none=True)
                x.grad = None

        else:  # one decoding step at context length ≈ seq_len
            tokens = point["batch"]
            state = layer.init_state(point["batch"])
            with torch.no_grad():
                for t in range(point["seq_len"]):
                    _, state = layer.step(x[:, t], state)
            # Sized at context seq_len, before the timed steps (which go on appending to it).
            state_bytes = state.nbytes()

            held = [state]  # each timed step continues from the state the last one returned

            def run() -> None:
                with torch.no_grad():
                    held[0] = layer.step(x[:, -1], held[0])[1]

        result = measure(run, point["repeats"], device)
    except (torch.OutOfMemoryError, MemoryError):
        return {**record, "oom": True}
    if point["pass"] == "step":  # what the decoding state holds at context length seq_len
        record["state_mb"] = state_bytes / 2**20
    return {
        **record,
        "oom": False,
        "ms": result["ms"],
        "ms_min": result["ms_min"],  # the range of the repeats: where two ranges overlap, neither is faster
        "ms_max": result["ms_max"],
        "repeats": point["repeats"],
        "tokens_per_s": tokens / (result["ms"] / 1000),
        "peak_mem_mb": result["peak_allocated_mb"],
        "peak_rss_extra_mb": result["peak_extra_mb"],
        "device_name": machine(device)["device"],
    }


class _Worker:
    """``python -m tokenmix.bench.worker``: takes points as JSON lines and forks a child per point."""

    def __init__(self) -> None:
        command = [sys.executable, "-m", "tokenmix.bench.worker"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, point: dict) -> dict:
        self.process.stdin.write(json.dumps(point) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark worker ended (exit code {self.process.wait()}) at {point}")
        answer = json.loads(line)
        if "record" in answer:
            return answer["record"]
        # Killed by the OS for memory (SIGKILL) counts as out of memory too; anything else is an error.
        if answer["exit"] in (-9, 137):
            return {**{k: point[k] for k in ("mixer", "seq_len", "pass", "device", "dtype")}, "oom": True}
        raise RuntimeError(f"benchmark point {point} failed:\n{answer.get('error', '')[-2000:]}")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def bench(
    mixers: Sequence[str],
    seq_lens: Sequence[int],
    *,
    dim: int = 256,
    batch: int = 1,
    passes: Sequence[str] = ("fwd+bwd",),
    dtype: str = "float32",
    device: str = "cpu",
    repeats: int = 5,
    causal: bool = True,
    options: dict[str, Any] | None = None,
    baselines: bool = True,
    peers: bool = False,
    out: str | Path | None = None,
) -> list[dict]:
    """Benchmark ``mixers`` at each of ``seq_lens`` for each pass; return the records and, with ``out``,
    write ``out/bench.json`` and the plots ``out/time.png`` and ``out/memory.png``."""
    known = list_mixers()
    for name in mixers:
        if name not in known:
            raise InvalidValueError(f"unknown mixer {name!r}; known mixers: {', '.join(known)}")
    for name in passes:
        if name not in PASSES:
            raise InvalidValueError(f"unknown pass {name!r}; expected some of {', '.join(PASSES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidValueError("device='cuda' was asked for but no CUDA device is available")
    for name, values in (("seq_lens", seq_lens), ("dim", [dim]), ("batch", [batch]), ("repeats", [repeats])):
        for value in values:
            check_positive_int(name, value)
    if not seq_lens:
        raise InvalidValueError("seq_lens must name at least one length")
    with torch.device("meta"):  # options a mixer rejects fail here, not in a worker's traceback
        for name in mixers:
            create_mixer(name, dim, causal=causal, **(options or {}))
    layers = list(mixers)
    if baselines:
        layers += list(BASELINES)
    if peers:
        for name in mixers:
            if name in PEERS:
                package, cls = PEERS[name]
                if causal and package in BIDIRECTIONAL_ONLY:
                    continue
                try:
                    __import__(package)
                except ImportError:
                    continue
                layers.append(f"{package}:{cls}")
    points = []
    for layer in layers:
        own = layer in known
        for pass_name in passes:
            if pass_name == "step" and (not own or not causal):
                continue  # only our causal mixers decode
            for seq_len in seq_lens:
                points.append(
                    {
                        "mixer": layer,
                        "seq_len": seq_len,
                        "pass": pass_name,
                        "device": device,
                        "dtype": dtype,
                        "batch": batch,
                        "dim": dim,
                        "repeats": repeats,
                        "causal": causal,
                        "options": options or {} if own else {},
                    }
                )
    worker = _Worker()
    try:
        records = [worker.run(point) for point in points]
    finally:
        worker.close()
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(records, indent=2))
        plot(records, out)
    return records


def ratios(records: list[dict]) -> list[dict]:
    """ours / peer time for each point where both were measured."""
    by_key = {(r["mixer"], r["seq_len"], r["pass"]): r for r in records if not r.get("oom")}
    rows = []
    for ours, (package, cls) in PEERS.items():
        for (name, seq_len, pass_name), record in by_key.items():
            peer = by_key.get((f"{package}:{cls}", seq_len, pass_name))
            if name == ours and peer is not None:
                rows.append(
                    {
                        "mixer": ours,
                        "peer": f"{package}:{cls}",
                        "seq_len": seq_len,
                        "pass": pass_name,
                        "ratio": record["ms"] / peer["ms"],
                    }
                )
    return rows


def plot(records: list[dict], out: Path) -> None:
    """time.png and memory.png: one panel per pass, log–log against N, one line per mixer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = sorted({r["pass"] for r in records}, key=PASSES.index)
    for key, label, filename in (
        ("ms", "milliseconds", "time.png"),
        ("peak_mem_mb", "peak MB", "memory.png"),
    ):
        figure, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 4), squeeze=False)
        for axis, pass_name in zip(axes[0], passes, strict=True):
            for mixer in dict.fromkeys(r["mixer"] for r in records):
                points = sorted(
                    (r["seq_len"], r[key])
                    for r in records
                    if r["mixer"] == mixer and r["pass"] == pass_name and not r.get("oom") and r[key] > 0
                )
                if points:
                    axis.plot(*zip(*points, strict=True), marker="o", label=mixer)
            axis.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel=label, title=pass_name)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / filename, dpi=120)
        plt.close(figure)

"""Compile every Triton kernel for an H100 (sm_90) on any machine, no GPU needed:

    python benchmarks/compile_sm90.py            # all ops → benchmarks/results/sm90-compile-<date>.json
    python benchmarks/compile_sm90.py --ops aft_local --out /tmp/c.json

Each op is called forward and backward with the block sizes and flags it uses on a GPU, its kernels'
launches recorded instead of run; each distinct launch is compiled through Triton's GPU pipeline to PTX
and, with the ptxas that Triton ships, to a cubin. Reports per compile the shared memory per block and the
registers per thread and spill bytes ptxas gives for sm_90a: what can be known of the kernels' fit on the
GPU without one. Triton's interpreter (the CPU tests) accepts code that this compiler rejects.

Must run without TRITON_INTERPRET in the environment (so @triton.jit makes compilable functions).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

OPS = ["pointwise_attention", "mixed_chunk_attention", "aft_simple", "aft_full", "aft_local", "aft_conv",
       "lightconv", "dynamic_conv"]  # fmt: skip


def _calls(op: str):
    """(function, tensors, options) cases of the op, masked: bfloat16 causal and not, float32 causal (its
    dots are IEEE, a separate compile); and packed (cu_seqlens, B = 1), bfloat16 causal and not."""
    from tokenmix import functional

    generator = torch.Generator().manual_seed(0)
    seq_len, dim = 96, 80
    mask = torch.rand(2, seq_len, generator=generator) > 0.2
    cu_seqlens = torch.tensor([0, 30, 31, 31, seq_len])

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=generator).to(dtype).requires_grad_()

    cases = []
    for dtype, causal, packed in (
        (torch.bfloat16, False, False),
        (torch.bfloat16, True, False),
        (torch.float32, True, False),
        (torch.bfloat16, False, True),
        (torch.bfloat16, True, True),
    ):
        batch = 1 if packed else 2
        options = {"causal": causal, **({"cu_seqlens": cu_seqlens} if packed else {"attention_mask": mask})}
        bnd = [randn(batch, seq_len, dim, dtype=dtype) for _ in range(3)]
        if op == "pointwise_attention":
            heads = [randn(batch, 2, seq_len, 64, dtype=dtype) for _ in range(3)]
            cases.append((functional.pointwise_attention, heads, {**options, "activation": "relu2"}))
        elif op == "mixed_chunk_attention":
            qk = [randn(batch, seq_len, 128, dtype=dtype) for _ in range(4)]
            cases.append((functional.mixed_chunk_attention, [*qk, bnd[0]], {**options, "chunk_size": 64}))
        elif op == "aft_simple":
            cases.append((functional.aft_simple, bnd, options))
        elif op == "aft_full":
            cases.append((functional.aft_full, [*bnd, randn(seq_len, seq_len, dtype=dtype)], options))
        elif op == "aft_local":
            w = randn(seq_len, seq_len, dtype=dtype)
            cases.append((functional.aft_local, [*bnd, w], {**options, "window": 8}))
        elif op == "aft_conv":
            qv = [randn(batch, seq_len, 4, 20, dtype=dtype) for _ in range(2)]
            tensors = [qv[0], randn(batch, seq_len, 4, dtype=dtype), qv[1], randn(4, 7, dtype=dtype)]
            cases.append((functional.aft_conv, tensors, options))
            if not causal and not packed:  # and on a 2-D grid (per-row band, per-head keys)
                grid = [randn(batch, 8, 12, 4, 20, dtype=dtype) for _ in range(2)]
                tensors = [grid[0], randn(batch, 8, 12, 4, dtype=dtype), grid[1], randn(4, 3, 5, dtype=dtype)]
                cases.append((functional.aft_conv, tensors, {"attention_mask": mask.view(2, 8, 12)}))
        elif op == "lightconv":
            cases.append((functional.lightconv, [bnd[0], randn(4, 7, dtype=dtype)], options))
        elif op == "dynamic_conv":
            kernel = randn(batch, seq_len, 4, 7, dtype=dtype)
            cases.append((functional.dynamic_conv, [bnd[0], kernel], options))
    return cases


_TYPES = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "int8": "i8",
    "int32": "i32",
    "int64": "i64",
}


def _signature(kernel, args, kwargs) -> tuple[dict, dict]:
    signature, constexprs = {}, {}
    values = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[str(value.dtype).removeprefix("torch.")]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    return signature, constexprs


def _compiled(source: ASTSource, options: dict):
    """``triton.compile`` for sm_90 down to a cubin, and the registers per thread and spill bytes that its
    own ptxas run reports (Triton passes -v and prints the log when asked; a fresh cache makes ptxas run):
    a second ptxas run of the PTX here took half the script's time."""
    log = io.StringIO()
    names = ("TRITON_DUMP_PTXAS_LOG", "TRITON_CACHE_DIR")
    saved = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=cache)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        finally:
            for name, value in saved.items():
                os.environ.pop(name) if value is None else os.environ.update({name: value})
    text = log.getvalue()
    usage = {
        "registers": int(re.search(r"Used (\d+) registers", text).group(1)),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", text).group(1)),
    }
    return compiled, usage


def compile_op(op: str) -> dict:
    """Records the kernel launches of the op's cases, then compiles each distinct one for sm_90: how many
    launches, and per compile its stages, shared memory (bytes), registers and spill bytes."""
    import tokenmix  # here, after main's check: the kernels must be built as compilable functions

    # Every module that holds a kernel name (its own or imported) gets the recorder.
    modules = [importlib.import_module(f"tokenmix.kernels.{name}") for name in
               ("_common", "aft.common", "aft.scan", "aft.simple", "aft.local", "aft.full", "conv", "flash",
                "pointwise_attention")]  # fmt: skip
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    patched = {}
    for module in modules:
        if hasattr(module, "interpreting"):  # the GPU's block sizes and dot options
            patched[(module, "interpreting")] = module.interpreting
            module.interpreting = lambda: False
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel") and isinstance(value, triton.runtime.jit.JITFunction):
                patched[(module, name)] = value
                setattr(module, name, Recorder(value))
    os.environ["TRITON_INTERPRET"] = "1"  # lets use_kernel take CPU tensors; the kernels are already built
    try:
        with tokenmix.use_backend("triton"):
            for function, tensors, options in _calls(op):
                out = function(*tensors, **options)
                torch.autograd.grad(out, tensors, torch.ones_like(out))
    finally:  # the next op records its own launches
        for (module, name), value in patched.items():
            setattr(module, name, value)
    seen, stages, shared, registers = set(), [], [], []
    for kernel, args, kwargs in launches:
        signature, constexprs = _signature(kernel, args, kwargs)
        key = (kernel.__name__, tuple(signature.items()), tuple(constexprs.items()))
        if key in seen:
            continue
        seen.add(key)
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        options = {option: kwargs[option] for option in ("num_warps", "num_stages") if option in kwargs}
        compiled, usage = _compiled(source, options)
        stages.append(sorted(compiled.asm))
        shared.append(compiled.metadata.shared)
        inputs = next(kind for kind in signature.values() if kind.startswith("*"))
        registers.append({"kernel": kernel.__name__, "inputs": inputs, **options, **constexprs, **usage})
    return {"launches": len(launches), "compiled": len(seen), "stages": stages, "shared": shared,
            "registers": registers}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", nargs="+", choices=OPS, default=OPS)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/sm90-compile-<date>.json)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter's functions do not compile")

    results = {}
    for op in args.ops:  # an op that fails is recorded and the others still compile
        try:
            results[op] = compile_op(op)
        except Exception:  # the compiler's own error, kept whole in the JSON
            results[op] = {"error": traceback.format_exc()}
            print(results[op]["error"], file=sys.stderr)
    for op, result in results.items():
        for row in result.get("registers", []):
            print(
                f"{op:22s} {row['kernel']:24s} {row['inputs']:6s} registers {row['registers']:3d}",
                f"spills {row['spill_bytes']:5d} B",
            )
    path = Path(args.out or f"benchmarks/results/sm90-compile-{datetime.date.today()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"target": "cuda sm_90", "triton": triton.__version__, "ops": results}, indent=2)
    )
    print(f"wrote {path}")
    failed = [op for op, result in results.items() if "error" in result]
    if failed:
        raise SystemExit(f"did not compile: {', '.join(failed)}")


if __name__ == "__main__":
    main()

"""Every kernel compiles for an H100 (sm_90): through Triton's GPU pipeline to PTX and, with the ptxas
that Triton ships, to a cubin, with the block sizes and flags the ops launch it with on a GPU. The
interpreter that the other kernel tests use is lenient where the compiler is not (operand dtypes of
tl.dot, shapes, atomics), so without a GPU this is what says the kernels build for one.

Runs on the CPU: in a subprocess without TRITON_INTERPRET (so @triton.jit makes compilable functions),
each op is called forward and backward with its kernels' launches recorded instead of run, and each
distinct launch is compiled ahead of time for the GPU target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPS = ["pointwise_attention", "mixed_chunk_attention", "aft_simple", "aft_full", "aft_local", "aft_conv",
       "lightconv", "dynamic_conv"]  # fmt: skip


@pytest.mark.parametrize("op", OPS)
def test_the_kernels_compile_for_sm90(op):
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONWARNINGS"] = "ignore"
    code = f"from tests.kernels.test_gpu_compile import compile_op; compile_op({op!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = json.loads(result.stdout.strip().splitlines()[-1])
    assert compiled["launches"] >= 2  # forward and backward
    assert all("cubin" in stages for stages in compiled["stages"]), compiled
    assert max(compiled["shared"]) <= 227 * 1024, compiled["shared"]  # an H100 block's shared memory


def _calls(op: str):
    """(function, tensors, options) cases of the op, masked: bfloat16 causal and not, float32 causal (its
    dots are IEEE, a separate compile)."""
    import torch

    from tokenmix import functional

    generator = torch.Generator().manual_seed(0)
    batch, seq_len, dim = 2, 96, 80
    mask = torch.rand(batch, seq_len, generator=generator) > 0.2

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=generator).to(dtype).requires_grad_()

    cases = []
    for dtype, causal in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, True)):
        options = {"causal": causal, "attention_mask": mask}
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
    import torch

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


def compile_op(op: str) -> None:
    """Record the kernel launches of the op's cases, then compile each distinct one for sm_90; prints a
    JSON line: how many launches, and the stages and shared memory (bytes) of each compile."""
    import importlib

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import tokenmix

    modules = [importlib.import_module(f"tokenmix.kernels.{name}") for name in
               ("_common", "aft", "conv", "flash", "pointwise_attention")]  # fmt: skip
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
    with tokenmix.use_backend("triton"):
        for function, tensors, options in _calls(op):
            out = function(*tensors, **options)
            torch.autograd.grad(out, tensors, torch.ones_like(out))
    for (module, name), value in patched.items():
        setattr(module, name, value)
    seen, stages, shared = set(), [], []
    for kernel, args, kwargs in launches:
        signature, constexprs = _signature(kernel, args, kwargs)
        key = (kernel.__name__, tuple(signature.items()), tuple(constexprs.items()))
        if key in seen:
            continue
        seen.add(key)
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        stages.append(sorted(compiled.asm))
        shared.append(compiled.metadata.shared)
    print(json.dumps({"launches": len(launches), "compiled": len(seen), "stages": stages, "shared": shared}))

"""Kernel tests run on a GPU when there is one, else on the CPU in Triton's interpreter (as in CI)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the kernels are defined (on first use): @triton.jit reads it then.
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# Relative error bounds of the kernels against the reference path, by input dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}

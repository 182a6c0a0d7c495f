"""The README's Python snippets run, in order, as a user would paste them."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write (runs/...) write here
    # torch.compile traces with dynamo as pasted, without inductor's minute of C++ code generation.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["y"].shape == (2, 100, 256)
    # The snippet claims the last decoding step equals the forward's last position.
    torch.testing.assert_close(namespace["y_t"], namespace["y"][:, -1], rtol=1e-5, atol=1e-6)
    assert namespace["text"].shape == (2, 40)
    assert [r["step"] for r in namespace["metrics"]] == [10, 20]
    assert namespace["reference_out"].shape == (2, 100, 64)

"""The README's Python snippets run, in order, as a user would paste them."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"  # the README's continuation: its snippets run after the README's


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write (runs/...) write here
    # torch.compile traces with dynamo as pasted, without inductor's minute of C++ code generation.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    text = README.read_text() + GUIDE.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md + docs/guide.md", "exec"), namespace)
    assert namespace["y"].shape == (2, 100, 256)
    # The snippet claims the last decoding step equals the forward's last position.
    torch.testing.assert_close(namespace["y_t"], namespace["y"][:, -1], rtol=1e-5, atol=1e-6)
    assert namespace["text"].shape == (2, 40)
    assert [r["step"] for r in namespace["metrics"]] == [10, 20]
    assert namespace["reference_out"].shape == (2, 100, 64)

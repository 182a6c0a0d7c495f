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


def test_readme_corpus_commands_run(tmp_path, monkeypatch, capsys):
    """The three commands from a folder of text to a trained BPE model run as written, the training
    cut to a few small steps."""
    import shlex

    from tokenmix.cli import main
    from tokenmix.data.documents import embedded_documents

    section = README.read_text().split("## From a folder of text", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1).strip().splitlines()
    assert [shlex.split(c)[:2] for c in commands] == [["tokenmix", "prepare"], ["tokenmix", "train"],
                                                     ["tokenmix", "generate"]]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-texts").mkdir()
    for number, chapter in enumerate(embedded_documents()[:30]):
        (tmp_path / "my-texts" / f"{number}.txt").write_bytes(chapter)
    shorter = {"train": ["--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--progress", "log",
                         "--dim", "32", "--seq-len", "64", "--batch-size", "4"],
               "generate": ["--max-new-tokens", "5"]}  # fmt: skip
    for command in commands:
        argv = shlex.split(command)[1:]
        assert main([*argv, *shorter.get(argv[0], [])]) == 0, command
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("Once upon a time")

"""Using a finished run (tokenmix.training.runs): a run keeps the tokenizer it trained with, and refuses
to score data that changed since."""

from __future__ import annotations

import json
import shutil

import pytest

from tokenmix.cli import main
from tokenmix.data.documents import embedded_documents
from tokenmix.data.prepared import prepare
from tokenmix.data.tokenizer import BPETokenizer
from tokenmix.training import evaluate, generate, train

TINY = {
    "mixer": "aft_simple", "dim": 16, "depth": 1, "seq_len": 16, "batch_size": 2, "steps": 2,
    "eval_every": 2, "eval_batches": 1, "warmup_steps": 1, "progress": "log",
}  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"text": chapter.decode()}) for chapter in embedded_documents()[:8]]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "b.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    return root


def test_a_run_keeps_its_tokenizer_when_its_data_is_prepared_again(corpus, tmp_path, capsys):
    """Issue 38.3: eval --split heldout, generate and export read the run's own tokenizer.json; eval of a
    split of data prepared again (another tokenizer, or other tokens) is refused in one line."""
    data, run = tmp_path / "data", tmp_path / "run"
    prepare(corpus / "a.jsonl", data, tokenizer="bpe", vocab_size=400)
    train(dict(TINY, data=str(data), out=str(run)))
    heldout = evaluate(run, "heldout", device="cpu")
    val = evaluate(run, "val", device="cpu")
    text = generate(run, "Call me", 8, temperature=0, device="cpu")

    prepare(corpus / "a.jsonl", data, tokenizer="bpe", vocab_size=300)  # another tokenizer
    assert evaluate(run, "heldout", device="cpu") == heldout
    assert generate(run, "Call me", 8, temperature=0, device="cpu") == text
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--split", "val", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "its tokenizer is not the run's" in err and err.count("\n") == 1, err

    prepare(corpus / "b.jsonl", data, tokenizer=run)  # the run's tokenizer, other documents
    assert main(["eval", "--run", str(run), "--split", "val", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "its tokens are not the ones the run trained on" in err and err.count("\n") == 1, err
    prepare(corpus / "a.jsonl", data, tokenizer=run)  # the data as it was: read again
    assert evaluate(run, "val", device="cpu") == val

    shutil.rmtree(data)  # gone: what needs no split still works
    assert generate(run, "Call me", 8, temperature=0, device="cpu") == text
    assert evaluate(run, "heldout", device="cpu") == heldout
    transformers = pytest.importorskip("transformers")
    from tokenmix.hf.export import export_run

    exported = transformers.AutoTokenizer.from_pretrained(export_run(run, tmp_path / "hf"))
    ours = BPETokenizer.load(run / "tokenizer.json")
    assert ours.vocab_size == 400 and len(exported) == 400
    sample = "one <|endoftext|> two"
    assert exported(sample).input_ids == ours.encode(sample.encode()).tolist()  # the text stays text

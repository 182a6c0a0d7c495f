"""lm-evaluation-harness on an exported run, offline, on the bundled held-out tasks: its bits per byte
equals `tokenmix eval --split heldout` on the run itself, and the documented command runs."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from tokenmix.cli import main
from tokenmix.data.heldout import cloze, heldout_sentences
from tokenmix.data.text import embedded_corpus, split
from tokenmix.data.tokenizer import BPETokenizer
from tokenmix.hf.export import export_run
from tokenmix.hf.lm_eval import evaluate as lm_evaluate
from tokenmix.hf.lm_eval import main as lm_eval_main
from tokenmix.training import evaluate, train
from tokenmix.training.runs import rolling_windows


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A charlm run whose context (32) is shorter than most held-out sentences (24–96 bytes), so they are
    scored in several windows, trained a few steps, exported."""
    root = tmp_path_factory.mktemp("lm-eval")
    config = {
        "mixer": "aft_local", "mixer_options": {"window": 8}, "dim": 32, "depth": 2, "seq_len": 32,
        "batch_size": 8, "steps": 30, "eval_every": 30, "eval_batches": 1, "warmup_steps": 3,
        "progress": "log", "out": str(root / "run"),
    }  # fmt: skip
    train(config)
    return root / "run", export_run(root / "run", root / "hf")


@pytest.fixture(scope="module")
def exported_bpe(tmp_path_factory, bpe_data):
    """A charlm run on a prepared BPE dataset (512 tokens), trained a few steps, exported."""
    root = tmp_path_factory.mktemp("lm-eval-bpe")
    config = {
        "data": str(bpe_data), "mixer": "softmax", "dim": 32, "depth": 1, "seq_len": 16, "batch_size": 8,
        "steps": 20, "eval_every": 20, "eval_batches": 1, "warmup_steps": 2, "progress": "log",
        "out": str(root / "run"),
    }  # fmt: skip
    train(config)
    return root / "run", export_run(root / "run", root / "hf")


def test_a_bpe_model_scores_the_same_bits_per_byte_in_the_harness(exported_bpe):
    """The exported fast tokenizer encodes as tokenmix does, so the harness's rolling windows are ours
    and its bits per byte (log-likelihood over the sentences' bytes) equals ``tokenmix eval``'s."""
    from transformers import AutoTokenizer

    run, directory = exported_bpe
    theirs, ours = AutoTokenizer.from_pretrained(directory), BPETokenizer.load(run / "tokenizer.json")
    for text in ("Call me Ishmael.", "Ünïcödé — 日本語 🙂\n\n  indented\ttab", *heldout_sentences()[:5]):
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text.encode()).tolist() and theirs.decode(ids) == text
    assert theirs.eos_token_id == theirs.bos_token_id == ours.end_of_text
    results = lm_evaluate(directory, ["tokenmix_heldout_bpb"])
    score = evaluate(run, "heldout", device="cpu")["heldout_bpc"]
    assert results["tokenmix_heldout_bpb"]["bits_per_byte,none"] == pytest.approx(score, abs=1e-5)
    sentences = [s.encode() for s in heldout_sentences()]
    tokens = sum(len(ours.encode(s)) for s in sentences)
    assert tokens < 0.8 * sum(map(len, sentences))  # BPE tokens: fewer than bytes, so the units differ


def test_the_heldout_sentences_are_whole_sentences_of_the_test_split_only():
    sentences = heldout_sentences()
    assert len(sentences) >= 50 and len(set(sentences)) == len(sentences)
    splits = {
        name: " ".join(bytes(t.numpy()).decode("utf-8", "ignore").split())
        for name, t in split(embedded_corpus()).items()
    }
    for sentence in sentences:
        assert sentence in splits["test"] and sentence not in splits["train"], sentence
        assert sentence.isascii() and 24 <= len(sentence) <= 96 and sentence[0].isupper()
        context, word = cloze(sentence)
        assert context + word + sentence[-1] == sentence and word.startswith(" ") and word[1:].isalpha()


def test_rolling_windows_are_the_harness_windows():
    from lm_eval.utils import get_rolling_token_windows

    for length in range(2, 80):
        for seq_len in (1, 3, 8, 32):
            document = list(range(100, 100 + length))
            theirs = list(get_rolling_token_windows(document[1:], document[0], seq_len, 1))
            ours = [
                (document[start:end], document[end - scored + 1 : end + 1])
                for start, end, scored in rolling_windows(length, seq_len)
            ]
            assert ours == theirs, (length, seq_len)


def test_lm_eval_bits_per_byte_equals_tokenmix_eval(exported):
    run, directory = exported
    results = lm_evaluate(directory)
    ours = evaluate(run, "heldout", device="cpu")
    assert results["tokenmix_heldout_bpb"]["sample_len"] == len(heldout_sentences())
    assert results["tokenmix_heldout_bpb"]["bits_per_byte,none"] == pytest.approx(
        ours["heldout_bpc"], abs=1e-5
    )  # (float32 logits; the same windows: a last window with less context differed by 1e-4 or more)
    assert 3 < ours["heldout_bpc"] < 8  # learned something (uniform: 8 bits), far from perfect
    cloze_scores = results["tokenmix_heldout_cloze"]
    assert 0 <= cloze_scores["acc,none"] <= 1 and math.isfinite(cloze_scores["perplexity,none"])


def test_the_harness_s_own_tasks_are_indexed_only_when_asked_for(exported, monkeypatch):
    """Indexing them reads ~15,000 task files; the bundled tasks alone do not need it."""
    import lm_eval
    import lm_eval.tasks

    made, asked = [], []
    real = lm_eval.tasks.TaskManager

    def manager(*args, include_defaults=True, **kwargs):
        made.append(include_defaults)  # the harness's index itself is not built here (10 s)
        return real(*args, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", manager)
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: asked.append(kw) or {"results": {}})
    _, directory = exported
    lm_evaluate(directory, ["tokenmix_heldout_bpb"])
    assert made == [False] and "tokenmix_heldout_bpb" in asked[-1]["task_manager"].all_tasks
    lm_evaluate(directory, ["tokenmix_heldout_bpb", "lambada_openai"])
    assert made[1:] == [False, True]


def test_the_documented_command_runs_offline_with_a_limit(exported, tmp_path, capsys):
    _, directory = exported
    out = tmp_path / "results"
    lm_eval_main(
        ["--model", "hf", "--model_args", f"pretrained={directory}", "--tasks", "tokenmix_heldout_cloze",
         "--limit", "5", "--device", "cpu", "--output_path", str(out)]
    )  # fmt: skip
    assert "tokenmix_heldout_cloze" in capsys.readouterr().out
    (written,) = out.rglob("results_*.json")
    scores = json.loads(written.read_text())["results"]["tokenmix_heldout_cloze"]
    assert scores["sample_len"] == 5 and 0 <= scores["acc,none"] <= 1


def test_heldout_evaluation_takes_charlm_runs_only(tmp_path, capsys):
    run = tmp_path / "mqar"
    train({"task": "mqar", "mixer": "softmax", "dim": 16, "depth": 1, "seq_len": 32, "batch_size": 4,
           "steps": 1, "eval_every": 1, "eval_batches": 1, "progress": "log", "out": str(run)})  # fmt: skip
    assert main(["eval", "--run", str(run), "--split", "heldout", "--device", "cpu"]) == 2
    assert "split 'heldout' is text" in capsys.readouterr().err


def test_bad_input_to_the_command_line_is_one_line(exported, tmp_path, capsys):
    _, directory = exported
    with pytest.raises(SystemExit) as missing:
        lm_eval_main(["--model", "hf", "--model_args", f"pretrained={tmp_path / 'nowhere'}", "--tasks",
                      "tokenmix_heldout_bpb"])  # fmt: skip
    assert missing.value.code == 2
    err = capsys.readouterr().err
    assert "is not a model directory" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as unknown:
        lm_eval_main(["--model", "hf", "--model_args", f"pretrained={directory},dtype=float32", "--tasks",
                      "tokenmix_nonexistent_task", "--device", "cpu"])  # fmt: skip
    assert unknown.value.code == 2
    assert "Tasks not found: tokenmix_nonexistent_task" in capsys.readouterr().err.splitlines()[-1]

from __future__ import annotations

import json
import os
import signal

import pytest

from tokenmix.bench.compare import compare, table
from tokenmix.cli import main


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    result = compare(["softmax", "aft_simple"], out=out, quick=True, steps=4, seq_lens=[32, 64], device="cpu")
    return out, result


def test_compare_writes_the_report_files(report):
    out, result = report
    for name in ("report.md", "report.html", "compare.json", "curves.png", "time.png", "memory.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(result))
    for mixer in ("softmax", "aft_simple"):
        run = result["mixers"][mixer]
        assert run["params"] > 0 and 0 < run["val_bpc"] < 9 and run["train_tokens_per_s"] > 0
        assert [step for step, _ in run["curve"]] == [4]
        assert (out / "runs" / mixer / "model.safetensors").is_file()


def test_the_table_has_every_field_for_every_mixer(report):
    out, result = report
    header, rows = table(result)
    assert header[:4] == ["mixer", "params", "val bpc", "train tok/s"]
    assert "ms fwd+bwd N=32" in header and "ms fwd+bwd N=64" in header and "state MB N=64" in header
    assert sorted(row[0] for row in rows) == ["aft_simple", "softmax"]
    assert all(len(row) == len(header) and "OOM" not in row for row in rows)
    markdown = (out / "report.md").read_text()
    assert "| " + " | ".join(header) + " |" in markdown and "![Learning curves](curves.png)" in markdown
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and page.count("<tr>") == 3


def test_the_state_column_shows_which_states_grow(report):
    """Measured at the longest length only: a KV cache holds every key and value (2 · N · d float32),
    AFT-simple's running sums three vectors of d, whatever N."""
    _, result = report
    state = {(r["mixer"], r["seq_len"]): r["state_mb"] for r in result["bench"] if r["pass"] == "step"}
    assert set(state) == {("softmax", 64), ("aft_simple", 64)}
    dim = result["budget"]["dim"]
    assert state["softmax", 64] == 2 * 64 * dim * 4 / 2**20
    assert state["aft_simple", 64] == 3 * dim * 4 / 2**20


def test_a_second_compare_reuses_finished_runs(report):
    out, result = report
    again = compare(["softmax"], out=out, quick=True, steps=4, seq_lens=[32], device="cpu")
    assert again["mixers"]["softmax"]["curve"] == result["mixers"]["softmax"]["curve"]


def test_compare_rejects_unknown_mixers_before_any_work(tmp_path, capsys):
    assert main(["compare", "--mixers", "softmax,nope", "--out", str(tmp_path / "c")]) == 2
    assert "unknown mixer 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_compare_never_writes_into_a_users_directory(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    assert main(["compare", "--mixers", "softmax", "--quick", "--steps", "2", "--out", str(mine)]) == 2
    assert "no tokenmix compare wrote" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["report.md"] and (
        mine / "report.md"
    ).read_text() == "my own report"


@pytest.mark.parametrize("signum,at_step", [(signal.SIGTERM, 3), (signal.SIGINT, 1)])
def test_a_signal_stops_the_whole_compare_and_the_next_one_resumes(tmp_path, monkeypatch, signum, at_step):
    """SIGTERM used to stop only the current mixer's training; SIGINT before a mixer's first evaluation
    ended in IndexError. Both stop compare; finished runs are reused and the cut one resumes."""
    from tokenmix.bench import compare as module

    real_train = module.train

    def train_and_signal(config):
        def hook(step):
            if step == at_step and config.mixer == "aft_simple":
                os.kill(os.getpid(), signum)

        return real_train(config, on_step=hook)

    out = tmp_path / "c"
    options = dict(out=out, quick=True, steps=4, seq_lens=[32], device="cpu")
    monkeypatch.setattr(module, "train", train_and_signal)
    with pytest.raises(KeyboardInterrupt, match="aft_simple"):
        compare(["softmax", "aft_simple", "lightconv"], **options)
    assert not (out / "runs" / "lightconv").exists() and not (out / "compare.json").exists()
    finished = (out / "runs" / "softmax" / "metrics.jsonl").read_text()
    if signum == signal.SIGINT:
        return  # resuming is the same for both signals; the benchmark makes it the slow half
    monkeypatch.setattr(module, "train", real_train)
    result = compare(["softmax", "aft_simple", "lightconv"], **options)
    assert (out / "runs" / "softmax" / "metrics.jsonl").read_text() == finished  # reused, not retrained
    assert all(run["curve"][-1][0] == 4 for run in result["mixers"].values())


def test_compare_interrupted_from_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    from tokenmix.bench import compare as module

    def interrupted(*args, **kwargs):
        raise module.CompareStopped("stopped while training softmax; run the same compare again to resume")

    monkeypatch.setattr(module, "_train_one", interrupted)
    assert main(["compare", "--mixers", "softmax", "--quick", "--out", str(tmp_path / "c")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run the same compare again" in err

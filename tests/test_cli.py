from __future__ import annotations

import json
import subprocess
import sys

from tokenmix import list_mixers, mixer_info
from tokenmix.cli import main


def test_list_shows_every_mixer_with_options(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in list_mixers():
        assert f"\n{name}\n" in f"\n{out}"
        for option, default in mixer_info(name).options.items():
            assert f"{option}={default!r}" in out


def test_list_json_is_machine_readable(capsys):
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list_mixers()
    assert all(row["causal"] and row["decoding_state"] for row in rows)


def test_python_dash_m_runs_and_rejects_no_command():
    ok = subprocess.run([sys.executable, "-m", "tokenmix", "list"], capture_output=True, text=True)
    assert ok.returncode == 0 and "pointwise" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "tokenmix"], capture_output=True, text=True)
    assert bad.returncode != 0 and "COMMAND" in bad.stderr


def test_train_eval_generate_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--dim", "32", "--depth", "1", "--seq-len", "32", "--batch-size", "8", "--steps", "4"]
    flags += ["--eval-every", "2", "--eval-batches", "2", "--progress", "log", "--mixer", "lightconv"]
    assert (
        main(["train", *flags, "--mixer-opt", "kernel_size=5", "--mixer-opt", "heads=4", "--out", str(out)])
        == 0
    )
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 4 and "val_bpc" in last
    config = json.loads((out / "config.json").read_text())
    assert config["mixer_options"] == {"kernel_size": 5, "heads": 4} and config["batch_size"] == 8
    assert (out / "model.safetensors").is_file() and (out / "model-best.safetensors").is_file()
    assert main(["eval", "--run", str(out), "--max-batches", "2"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["split"] == "test" and scores["test_bpc"] > 0
    assert main(["generate", "--run", str(out), "--prompt", "Whale", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("Whale")


def test_bad_training_input_is_one_line_and_a_nonzero_exit(tmp_path, capsys):
    out = tmp_path / "run"
    small = ["--dim", "16", "--depth", "1", "--seq-len", "16", "--batch-size", "4", "--steps", "2"]
    cases = {
        "unknown mixer 'nope'": ["--mixer", "nope"],
        "got unknown option(s) colour": ["--mixer-opt", "colour=3"],
        "--mixer-opt expects KEY=VALUE": ["--mixer-opt", "heads"],
        "does not exist or is not a file": ["--data", str(tmp_path / "missing.txt")],
        "too short for seq_len=16": ["--data", str(tmp_path / "tiny.txt")],
    }
    (tmp_path / "tiny.txt").write_text("far too short")
    for message, extra in cases.items():
        assert main(["train", *small, *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing was written
    assert main(["train", *small, "--out", str(out)]) == 0
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["train", *small, "--dim", "24", "--out", str(out), "--resume"]) == 2
    assert "different configuration (dim: 16 != 24)" in capsys.readouterr().err
    assert main(["train", *small, "--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path / "nothing")]) == 2
    assert "holds no training run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written

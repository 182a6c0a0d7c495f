from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
        "time_budget must be a finite number of seconds > 0, got -1.0": ["--time-budget", "-1"],
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


SMALL = ["--dim", "16", "--depth", "1", "--seq-len", "16", "--batch-size", "4", "--steps", "2"]
SMALL += ["--eval-every", "2", "--eval-batches", "1", "--progress", "log"]


def files_under(path):
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} if path.exists() else {}


def assert_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_out_never_deletes_or_overwrites_a_users_files(tmp_path, capsys):
    """The issue's case: a checkpoints/ folder of the user's under --out was deleted by the first
    checkpoint. Any non-empty directory that is not a run is refused, and left as it was."""
    user = tmp_path / "u"
    (user / "checkpoints" / "x").mkdir(parents=True)
    (user / "checkpoints" / "x" / "w.bin").write_text("keep")
    (user / "config.txt").write_text("mine")
    before = files_under(user)
    for command in (["train", *SMALL, "--out", str(user)], ["train", *SMALL, "--out", str(user), "--resume"]):
        assert main(command) == 2
        assert files_under(user) == before
    assert "not a tokenmix run" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", *SMALL, "--out", str(empty)]) == 0  # an empty directory is fine


def test_a_run_that_fails_validation_writes_nothing(tmp_path, capsys):
    """The model is built and run on one batch before the run directory is touched."""
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--mixer", "aft_full", "--mixer-opt", "max_len=8", "--out", str(out)]
    assert_one_line_exit_2(argv, "max_len=8", capsys)
    assert not out.exists()


def test_resume_of_a_run_without_a_checkpoint_starts_at_step_0(tmp_path, capsys):
    """Killed before its first checkpoint: config.json and metrics.jsonl exist, nothing else."""
    from tokenmix.training import train
    from tokenmix.training.checkpoint import latest_checkpoint

    out = tmp_path / "run"
    argv = ["train", *SMALL, "--out", str(out)]

    def crash(step):
        raise SystemExit("killed")

    config = dict(
        task="charlm", dim=16, depth=1, seq_len=16, batch_size=4, steps=2, eval_every=2, eval_batches=1,
        progress="log", out=str(out),
    )  # fmt: skip
    with pytest.raises(SystemExit):
        train(config, on_step=crash)
    assert (out / "config.json").is_file() and latest_checkpoint(out) is None
    assert_one_line_exit_2(argv, "pass --resume", capsys)
    assert main([*argv, "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fresh = tmp_path / "fresh"
    assert main(["train", *SMALL, "--out", str(fresh)]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: v for k, v in resumed.items() if k != "tokens_per_s"} == {
        k: v for k, v in expected.items() if k != "tokens_per_s"
    }


def test_a_second_writer_on_a_run_exits_2_naming_the_holder(tmp_path, capsys):
    """While a run trains it holds its lock: a second ``train --resume`` on it is refused."""
    from tokenmix.training import train

    out = tmp_path / "run"
    argv = ["train", *SMALL, "--steps", "4", "--out", str(out), "--resume"]
    seen = []

    def second_writer(step):
        if step == 1:
            seen.append(main(argv))
            seen.append(capsys.readouterr().err)

    config = dict(
        task="charlm", dim=16, depth=1, seq_len=16, batch_size=4, steps=4, eval_every=2, eval_batches=1,
        progress="log", out=str(out),
    )  # fmt: skip
    records = train(config, on_step=second_writer)
    assert seen[0] == 2 and f"pid {os.getpid()}" in seen[1] and "one writer per run" in seen[1], seen
    assert [r["step"] for r in records] == [2, 4]
    # Another process holding the lock is named too; once it is gone the run can be written again.
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_one_line_exit_2(argv, f"pid {holder.pid}", capsys)
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0


HOLD_LOCK = """
import sys, time
from pathlib import Path
from tokenmix.training.checkpoint import RunLock
with RunLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_bad_input_is_one_line_and_exit_2_never_a_traceback(tmp_path, capsys):
    import torch

    run = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(run)]) == 0
    capsys.readouterr()
    not_gzip = tmp_path / "x.gz"
    not_gzip.write_text("plain text, not gzip " * 20)
    a_file = tmp_path / "file"
    a_file.write_text("a file")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"body": "no text field"}\n')
    new = str(tmp_path / "new")
    cases = [
        (["train", *SMALL, "--data", str(not_gzip), "--out", new], "not a complete gzip file"),
        (["train", *SMALL, "--out", str(a_file / "run")], "is a file, not a directory"),
        (["eval", "--run", str(run), "--device", "foo"], "device must be"),
        (["eval", "--run", str(run), "--max-batches", "0"], "--max-batches"),
        (["eval", "--run", str(run), "--max-batches", "-1"], "--max-batches"),
        (["train", *SMALL, "--lr", "inf", "--out", new], "lr must be"),
        (["train", *SMALL, "--lr", "nan", "--out", new], "lr must be"),
        (["train", *SMALL, "--lr", "-1", "--out", new], "lr must be"),
        (["train", *SMALL, "--weight-decay", "-1", "--out", new], "weight_decay must be"),
        (["train", *SMALL, "--grad-clip", "nan", "--out", new], "grad_clip must be"),
        (["bench", "--seq-lens", "0"], "--seq-lens"),
        (["bench", "--seq-lens", "x"], "--seq-lens"),
        (["bench", "--dim", "0"], "dim must be positive"),
        (["bench", "--repeats", "0"], "repeats must be positive"),
        (["bench", "--mixers", "aft_local", "--mixer-opt", "window=-1"], "window must be positive"),
        (["compare", "--steps", "0", "--out", new], "steps must be positive"),
        (["train", *SMALL, "--task", "mqar", "--pack", "--out", new], "pack applies to the charlm task"),
        (["train", *SMALL, "--pack", "--data", str(bad_jsonl), "--out", new], "line 1 has no string field"),
        (["train", *SMALL, "--pack", "--data", str(tmp_path / "none.jsonl"), "--out", new], "does not exist"),
    ]
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    bad_gz_dir = tmp_path / "gzdir"
    bad_gz_dir.mkdir()
    (bad_gz_dir / "a.txt").write_text("fine text " * 50)
    (bad_gz_dir / "b.gz").write_text("not gzip")
    bad_jsonl_gz = tmp_path / "d.jsonl.gz"
    bad_jsonl_gz.write_text("not gzip")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    one_byte_documents = tmp_path / "one-byte.jsonl"
    one_byte_documents.write_text("".join(json.dumps({"text": "abcdefgh"[i % 8]}) + "\n" for i in range(400)))
    cases += [
        (["train", *SMALL, "--data", str(latin1), "--out", new], "line 2 is not UTF-8"),
        (["train", *SMALL, "--pack", "--data", str(latin1), "--out", new], "line 2 is not UTF-8"),
        (["train", *SMALL, "--data", str(bad_gz_dir), "--out", new], "not a complete gzip file"),
        (["train", *SMALL, "--pack", "--data", str(bad_jsonl_gz), "--out", new], "not a complete gzip file"),
        (["train", *SMALL, "--data", str(empty), "--out", new], "holds no text"),
        (["train", *SMALL, "--pack", "--data", str(one_byte_documents), "--out", new], "no token to predict"),
    ]
    if not torch.cuda.is_available():
        cases += [
            (["train", *SMALL, "--device", "cuda", "--out", new], "CUDA is not available"),
            (["eval", "--run", str(run), "--device", "cuda"], "CUDA is not available"),
        ]
    for argv, message in cases:
        assert_one_line_exit_2(argv, message, capsys)
    assert not (tmp_path / "new").exists() and not (tmp_path / "bench-out").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "other shapes"])
def test_damaged_weights_and_checkpoints_are_one_line_and_exit_2(tmp_path, capsys, damage):
    from tokenmix.training.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "4", "--out", str(run)]) == 0
    capsys.readouterr()
    checkpoint = latest_checkpoint(run)
    targets = [run / "model-best.safetensors", run / "model.safetensors", checkpoint / "model.safetensors"]
    good = (checkpoint / "model.safetensors").read_bytes()
    if damage == "other shapes":
        other = tmp_path / "other"
        assert main(["train", *SMALL, "--dim", "24", "--out", str(other)]) == 0
        capsys.readouterr()
    for target in targets:
        data = target.read_bytes()
        damaged = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(200)}
        target.write_bytes(
            (other / "model.safetensors").read_bytes() if damage == "other shapes" else damaged[damage]
        )
    expected = "do not fit the model" if damage == "other shapes" else "not a complete safetensors file"
    resume = ["train", *SMALL, "--steps", "4", "--out", str(run), "--resume"]
    assert_one_line_exit_2(["eval", "--run", str(run)], expected, capsys)
    assert_one_line_exit_2(["generate", "--run", str(run), "--prompt", "a"], expected, capsys)
    assert_one_line_exit_2(resume, expected, capsys)
    (checkpoint / "model.safetensors").write_bytes(good)
    trainer = checkpoint / "trainer.pt"
    trainer.write_bytes({"empty": b"", "garbage": os.urandom(200)}.get(damage, trainer.read_bytes()[:300]))
    assert_one_line_exit_2(resume, "is not a complete checkpoint", capsys)


def test_divergence_says_whether_a_checkpoint_exists(tmp_path, capsys, monkeypatch):
    import tokenmix.training.trainer as trainer
    from tokenmix.errors import DivergedError
    from tokenmix.training import train

    config = dict(
        task="charlm", dim=16, depth=1, seq_len=16, batch_size=4, steps=6, eval_every=2, eval_batches=1,
        progress="log",
    )  # fmt: skip
    original = trainer._Run.train_step
    for when, message in ((0, "no checkpoint was written yet"), (3, "the last checkpoint is kept")):

        def poisoned(self, *args, when=when):
            if self.step == when:  # weights gone bad: the next loss is NaN
                for parameter in self.model.parameters():
                    parameter.data.fill_(float("nan"))
            return original(self, *args)

        monkeypatch.setattr(trainer._Run, "train_step", poisoned)
        with pytest.raises(DivergedError, match=message):
            train(dict(config, out=str(tmp_path / f"run{when}")))
        # From the command line: one line, exit 2.
        argv = ["train", *SMALL, "--steps", "6", "--out", str(tmp_path / f"cli{when}")]
        assert_one_line_exit_2(argv, message, capsys)


def test_generate_streams_greedy_stops_at_eos_and_takes_top_p(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "4", "--out", str(run)]) == 0
    capsys.readouterr()
    argv = ["generate", "--run", str(run), "--prompt", "Whale", "--max-new-tokens", "9"]
    assert main([*argv, "--greedy"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("Whale") and main([*argv, "--greedy"]) == 0
    assert capsys.readouterr().out == greedy  # greedy is deterministic
    import torch

    from tokenmix.training import load_run

    _, _, model = load_run(run, device="cpu")
    first = int(model.generate(torch.tensor([list(b"Whale")]), 1, temperature=0)[0, -1])
    assert main([*argv, "--greedy", "--eos", str(first)]) == 0
    expected = (b"Whale" + bytes([first])).decode("utf-8", errors="replace")
    assert capsys.readouterr().out == expected + "\n"  # stopped at the first new byte
    assert main([*argv, "--top-p", "0.5", "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("Whale")
    assert_one_line_exit_2([*argv, "--eos", "ab"], "--eos", capsys)
    assert_one_line_exit_2([*argv, "--top-p", "1.5"], "top_p", capsys)
    assert_one_line_exit_2([*argv, "--eos", "²"], "--eos", capsys)  # a digit, but not 0-9
    assert_one_line_exit_2([*argv, "--eos", "٣"], "--eos", capsys)  # (int() reads it as 3)
    assert_one_line_exit_2([*argv, "--seed", "99999999999999999999999"], "seed must be", capsys)
    # a temperature so small that logits / T overflow: the most likely byte, as greedy
    assert main([*argv, "--temperature", "1e-45"]) == 0
    assert capsys.readouterr().out == greedy
    # a prompt that is not UTF-8 (the command line hands it over surrogate-escaped): its bytes, as given
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert main(["generate", "--run", str(run), "--prompt", latin1, "--max-new-tokens", "3", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("caf\ufffd")


def test_a_config_file_sets_the_run_and_flags_override_it(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'mixer = "aft_local"\ndim = 16\ndepth = 1\nseq-len = 16\nbatch_size = 4\nsteps = 9\neval_every = 2\n'
        'eval_batches = 1\nprogress = "log"\n[mixer_options]\nwindow = 3\n'
    )
    run = tmp_path / "run"
    assert (
        main(
            ["train", "--config", str(toml), "--steps", "2", "--mixer-opt", "bias_rank=4", "--out", str(run)]
        )
        == 0
    )
    config = json.loads((run / "config.json").read_text())
    assert config["mixer"] == "aft_local" and config["seq_len"] == 16 and config["steps"] == 2
    assert config["mixer_options"] == {"window": 3, "bias_rank": 4}
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({key: value for key, value in config.items() if key != "out"}))
    again = tmp_path / "again"
    assert main(["train", "--config", str(as_json), "--out", str(again)]) == 0
    assert (again / "metrics.jsonl").read_text().count("\n") == (run / "metrics.jsonl").read_text().count(
        "\n"
    )
    capsys.readouterr()
    (tmp_path / "bad.toml").write_text("steps = [")
    (tmp_path / "unknown.json").write_text('{"stpes": 3}')
    (tmp_path / "list.json").write_text("[1, 2]")
    for argv, message in [
        (["train", "--config", str(tmp_path / "bad.toml")], "could not be read"),
        (["train", "--config", str(tmp_path / "unknown.json")], "unknown training option(s): stpes"),
        (["train", "--config", str(tmp_path / "list.json")], "must hold a table of options"),
        (["train", "--config", str(tmp_path / "missing.toml")], "does not exist"),
        (["train", "--config", str(toml)[:-5] + ".yaml"], "does not exist"),
    ]:
        assert_one_line_exit_2([*argv, "--out", str(tmp_path / "never")], message, capsys)
    assert not (tmp_path / "never").exists()


def test_log_tensorboard_writes_the_metrics_as_events(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--log", "tensorboard", "--out", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for name in ("train_loss", "val_loss", "val_bpc", "lr", "tokens_per_s"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in records], name


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("device = 5", "device must be a string"),
        ('mixer_options = "x"', "mixer_options must be a table"),
        ("data = 5", "data must be a string"),
        ("num_pairs = 4.5", "num_pairs must be an integer"),
        ('vocab_size = "64"', "vocab_size must be an integer"),
        ("eval_batches = 1.5", "eval_batches must be an integer"),
        ("eval_batches = true", "eval_batches must be an integer"),
        ('ffn = "false"', "ffn must be true or false"),
        ('compile = "no"', "compile must be true or false"),
        ("seq-len = 16\nseq_len = 32", "sets seq_len twice"),
    ],
)
def test_a_config_files_values_are_type_checked_before_anything_is_written(tmp_path, capsys, line, message):
    toml = tmp_path / "run.toml"
    toml.write_text(f'dim = 16\ndepth = 1\nsteps = 1\nprogress = "log"\n{line}\n')
    run = tmp_path / "run"
    argv = ["train", "--config", str(toml), "--out", str(run)]
    assert_one_line_exit_2(argv, message, capsys)
    assert_one_line_exit_2([*argv, "--mixer-opt", "heads=2"], message, capsys)
    assert not run.exists()

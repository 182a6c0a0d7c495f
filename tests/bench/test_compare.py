from __future__ import annotations

import json
import os
import random
import signal
import statistics
from dataclasses import replace

import pytest
import torch

from tokenmix import list_mixers, mixer_info
from tokenmix.bench.compare import compare
from tokenmix.bench.report import (
    LABELS,
    RULE,
    mean_and_spread,
    pareto_front,
    ranking,
    same_curves,
    summary,
    table,
    tied_with_best,
    unseparated_neighbours,
)
from tokenmix.cli import main
from tokenmix.errors import RunDirectoryError

WORDS = [
    "the",
    "whale",
    "sea",
    "ship",
    "captain",
    "harpoon",
    "deck",
    "sail",
    "storm",
    "crew",
    "white",
    "ocean",
    "wind",
    "night",
    "rope",
    "boat",
]


@pytest.fixture(scope="module")
def user_text(tmp_path_factory):
    """A text tokenmix has never seen: random sentences over a small vocabulary (about 20 kB)."""
    generator = random.Random(7)
    sentences = (" ".join(generator.choices(WORDS, k=generator.randint(4, 12))) + "." for _ in range(600))
    path = tmp_path_factory.mktemp("data") / "harbour-log.txt"
    path.write_text(" ".join(sentences))
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory, user_text):
    out = tmp_path_factory.mktemp("compare")
    result = compare(
        ["softmax", "aft_simple"],
        out=out,
        quick=True,
        steps=4,
        seeds=2,
        data=str(user_text),
        seq_lens=[32, 64],
        device="cpu",
    )
    return out, result


def test_compare_writes_the_report_files(report):
    out, result = report
    names = ("report.md", "report.html", "compare.json", "curves.png", "pareto.png", "time.png", "memory.png")
    for name in names:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(result))
    # Issue 37.3: every pair's test is recorded; two seeds call nothing apart, and the report says why.
    assert [(pair["a"], pair["b"]) for pair in result["pairs"]] == [
        ("aft_simple", "identity"), ("aft_simple", "softmax"), ("identity", "softmax")
    ]  # fmt: skip
    assert all(pair["p"] is None and not pair["apart"] for pair in result["pairs"])
    assert "2 seeds per mixer: fewer than 3" in (out / "report.md").read_text()
    assert result["floor"] is None  # bits per byte: no floor stated (issue 37.2)
    for mixer in ("softmax", "aft_simple"):
        run = result["mixers"][mixer]
        assert run["params"] > 0 and 0 < run["test_bpc"] < 9 and run["train_tokens_per_s"] > 0
        for seed in (0, 1):
            assert (out / "runs" / mixer / f"seed-{seed}" / "model.safetensors").is_file()


def test_every_seed_is_its_own_run_and_the_report_gives_the_spread(report, user_text):
    out, result = report
    # Issue 37.3: the table reports the test split; the validation split is the curves' (and choices')
    assert result["seeds"] == [0, 1] and result["metric"] == "test_bpc" and result["selection"] == "val_bpc"
    for name, run in result["mixers"].items():
        seeds = [r["seed"] for r in run["runs"]]
        assert seeds == [0, 1], name
        values = [r["test_bpc"] for r in run["runs"]]
        assert values[0] != values[1], name  # different initialisations and batches
        assert all(
            r["steps"] == 4 and r["train_seconds"] > 0 and [s for s, _ in r["curve"]] == [4]
            for r in run["runs"]
        )
        assert all(r["test_bpc"] != r["val_bpc"] for r in run["runs"])  # another split's text
        assert run["test_bpc"] == pytest.approx(statistics.fmean(values))
        assert run["spread"] == pytest.approx(statistics.stdev(values))
        val = [r["val_bpc"] for r in run["runs"]]
        assert run["val_bpc"] == pytest.approx(statistics.fmean(val))
        assert run["val_spread"] == pytest.approx(statistics.stdev(val))
        # Each record is what its own run directory logged.
        for record in run["runs"]:
            logged = (
                (out / "runs" / name / f"seed-{record['seed']}" / "metrics.jsonl").read_text().splitlines()
            )
            assert json.loads(logged[-1])["val_bpc"] == record["val_bpc"]
    markdown = (out / "report.md").read_text()
    assert (
        markdown.count(" ± ") >= 2
        and user_text.name in markdown
        and "![Quality against cost](pareto.png)" in markdown
    )
    assert RULE in markdown


def test_the_table_has_every_field_for_every_mixer(report):
    out, result = report
    header, rows = table(result)
    assert header[:5] == ["mixer", "params", "test bpc", "≈ best", "seeds"]
    assert "ms fwd+bwd N=32" in header and "ms fwd+bwd N=64" in header and "state MB N=64" in header
    assert sorted(row[0] for row in rows) == ["aft_simple", "identity", "softmax"]  # the control joins
    assert all(len(row) == len(header) and "OOM" not in row for row in rows)
    means = [result["mixers"][row[0]]["test_bpc"] for row in rows]
    assert means == sorted(means)  # best (lowest bits per byte) first
    markdown = (out / "report.md").read_text()
    assert "| " + " | ".join(header) + " |" in markdown and "![Learning curves](curves.png)" in markdown
    page = (out / "report.html").read_text()
    assert (
        page.count("data:image/png;base64,") == 4 and page.count("<tr>") == 4
    )  # header, two mixers, the control


def test_the_state_column_shows_which_states_grow(report):
    """Measured at the longest length only: a KV cache holds every key and value (2 · N · d float32),
    AFT-simple's running sums three vectors of d, whatever N."""
    _, result = report
    state = {(r["mixer"], r["seq_len"]): r["state_mb"] for r in result["bench"] if r["pass"] == "step"}
    assert set(state) == {("softmax", 64), ("aft_simple", 64), ("identity", 64)}
    assert state["identity", 64] == 0  # the control carries nothing
    dim = result["budget"]["dim"]
    assert state["softmax", 64] == 2 * 64 * dim * 4 / 2**20
    assert state["aft_simple", 64] == 3 * dim * 4 / 2**20


@pytest.fixture
def no_benchmark(monkeypatch):
    """For tests of the training half: the benchmark (a subprocess per point) is skipped."""
    from tokenmix.bench import compare as module

    monkeypatch.setattr(module, "_bench_all", lambda *args: [])


def test_a_second_compare_reuses_finished_runs(report, user_text, no_benchmark):
    out, result = report
    again = compare(
        ["softmax"], out=out, quick=True, steps=4, seeds=2, data=str(user_text), seq_lens=[32], device="cpu"
    )
    assert again["mixers"]["softmax"]["runs"] == result["mixers"]["softmax"]["runs"]


def _result(values: dict[str, list[float]], metric: str = "val_bpc", curves=None, loss_curves=None) -> dict:
    """A compare result holding only what the statistics read."""
    mixers = {}
    for name, per_seed in values.items():
        runs = [
            {
                "seed": seed,
                metric: value,
                "curve": (curves or {}).get(name, [[(10, value)]] * len(per_seed))[seed],
            }
            for seed, value in enumerate(per_seed)
        ]
        if loss_curves is not None:
            for run, curve in zip(runs, loss_curves[name], strict=True):
                run["loss_curve"] = curve
        mean, spread = mean_and_spread(per_seed)
        mixers[name] = {"runs": runs, metric: mean, "spread": spread}
    return {"metric": metric, "mixers": mixers}


def _with_costs(result: dict) -> dict:
    """What summary() reads beyond the statistics: no benchmark, a second per step for every mixer."""
    for run in result["mixers"].values():
        run["seconds_per_step"] = 1.0
    return {**result, "bench": [], "budget": {"seq_lens": [16]}}


def test_mixers_within_the_noise_of_the_best_are_marked_so():
    # b: 0.01 from the best with spreads of ~0.03 — not separable; c: 0.5 away — separable.
    result = _result({"a": [3.00, 3.04, 2.98], "b": [3.01, 3.05, 2.99], "c": [3.50, 3.52, 3.49]})
    assert ranking(result) == ["a", "b", "c"] and tied_with_best(result) == {"a", "b"}
    assert unseparated_neighbours(result) == [("a", "b")]
    result["mixers"]["d"] = _result({"d": [3.49, 3.53, 3.51]})["mixers"]["d"]  # within c's noise
    assert unseparated_neighbours(result) == [("a", "b"), ("c", "d")]
    lines = " ".join(summary(_with_costs(result)))
    assert "Neighbours in the ranking that the data cannot tell apart: c ≈ d." in lines  # a ≈ b: ≈ best
    # Accuracy: higher is better.
    result = _result({"a": [0.50, 0.52, 0.51], "b": [0.90, 0.91, 0.93]}, metric="val_acc")
    assert ranking(result) == ["b", "a"] and tied_with_best(result) == {"b"}
    # One seed: no spread, nothing separable, and the summary names no winner.
    one = _result({"a": [3.0], "c": [3.5]})
    assert tied_with_best(one) == {"a", "c"}


def test_mixers_that_learned_the_same_model_are_named():
    same = [[(5, 3.2), (10, 3.0)], [(5, 3.3), (10, 3.1)]]
    near = [[(5, 3.2 + 1e-6), (10, 3.0)], [(5, 3.3), (10, 3.1 - 2e-6)]]
    apart = [[(5, 3.2), (10, 3.0)], [(5, 3.3), (10, 3.05)]]
    result = _result({"aft_full": [3.0, 3.1], "aft_local": [3.0, 3.1], "x": [3.0, 3.05]},
                     curves={"aft_full": same, "aft_local": near, "x": apart})  # fmt: skip
    pairs = same_curves(result)
    assert [(a, b) for a, b, _ in pairs] == [("aft_full", "aft_local")] and pairs[0][2] == pytest.approx(2e-6)


def test_accuracies_that_tie_by_coarseness_are_not_the_same_model():
    """Accuracy moves in steps of 1/examples: equal accuracy curves with different losses are two
    models; equal loss curves are one."""
    accuracy = [[(5, 0.25), (10, 0.5)]]
    losses = {"aft_conv": [[(5, 2.1), (10, 1.7)]], "softmax": [[(5, 2.0), (10, 1.2)]]}
    result = _result({"aft_conv": [0.5], "softmax": [0.5]}, metric="val_acc",
                     curves={"aft_conv": accuracy, "softmax": accuracy}, loss_curves=losses)  # fmt: skip
    assert same_curves(result) == []
    losses["aft_conv"] = losses["softmax"]
    result = _result({"aft_conv": [0.5], "softmax": [0.5]}, metric="val_acc",
                     curves={"aft_conv": accuracy, "softmax": accuracy}, loss_curves=losses)  # fmt: skip
    assert [(a, b) for a, b, _ in same_curves(result)] == [("aft_conv", "softmax")]


@pytest.mark.parametrize(("metric", "values", "words"), [
    ("val_acc", {"softmax": [0.9], "aft_simple": [0.35]}, "Highest mean: softmax (0.900)"),
    ("val_bpc", {"softmax": [2.5], "aft_simple": [3.1]}, "Lowest mean: softmax (2.500)"),
])  # fmt: skip
def test_one_seed_names_the_best_by_the_metrics_direction(metric, values, words):
    assert words in " ".join(summary(_with_costs(_result(values, metric=metric))))


def test_the_pareto_front_keeps_only_undominated_mixers():
    points = {"cheap-bad": (1.0, 3.5), "dear-good": (5.0, 3.0), "dominated": (5.0, 3.6), "mid": (2.0, 3.2)}
    assert pareto_front(points, higher_is_better=False) == {"cheap-bad", "dear-good", "mid"}
    assert pareto_front(points, higher_is_better=True) == {"cheap-bad", "dominated"}


def test_a_time_budget_sets_each_runs_steps_from_its_speed_measured_just_before_it(
    tmp_path, monkeypatch, no_benchmark, user_text, capsys, paced_steps
):
    """The first plan = budget / seconds per step measured right before the run (issue 37.4: not once for
    all, so a machine that got busier since the comparison began does not leave later runs short or
    long), with the machine's threads or one, whichever was faster; the trainer then re-plans at the
    pace the run trains, so each run fills its budget and its schedule completes; the report lists
    them."""
    from tokenmix.bench import compare as module

    # Seconds a step, run by run, with 2 threads and with 1: softmax's second run finds the machine busy.
    speeds = {"aft_simple": [{2: 0.05, 1: 0.1}] * 2, "softmax": [{2: 0.2, 1: 0.4}, {2: 0.4, 1: 0.1}],
              "identity": [{2: 0.05, 1: 0.08}] * 2}  # fmt: skip
    timed = []
    real = module.measure_steps

    def measured(config, steps=0):
        found = real(config, 0)
        if not steps:
            return found
        mixer, threads = config["mixer"], torch.get_num_threads()
        timed.append((mixer, threads))
        speed = speeds[mixer][timed.count((mixer, threads)) - 1][threads]
        # one timed step slowed fourfold by the machine: the median ignores it, the range reports it
        times = (speed, speed, speed * 4, speed, speed)[:steps]
        return found._replace(seconds_per_step=speed, step_seconds=times)

    monkeypatch.setattr(module, "measure_steps", measured)
    # The machine as the runs find it: softmax trains at 0.15 s a step, which neither timing foresaw.
    threads_trained = []
    paced_steps.update(aft_simple=0.05, identity=0.05)
    paced_steps["softmax"] = lambda step: threads_trained.append(torch.get_num_threads()) or 0.15
    monkeypatch.setattr(module.torch, "get_num_threads", lambda: threads[0])
    monkeypatch.setattr(module.torch, "set_num_threads", lambda count: threads.__setitem__(0, count))
    threads = [2]  # the machine's count, as compare sees it
    out = tmp_path / "c"
    options = dict(
        out=out, quick=True, seeds=2, time_budget=0.6, data=str(user_text), seq_lens=[16], device="cpu"
    )
    result = compare(["aft_simple", "softmax"], **options)
    steps = {name: [r["steps"] for r in run["runs"]] for name, run in result["mixers"].items()}
    assert steps == {"aft_simple": [12, 12], "softmax": [4, 4], "identity": [12, 12]}
    for run in (r for mixer in result["mixers"].values() for r in mixer["runs"]):
        assert run["train_seconds"] == pytest.approx(0.6) and not run["off_budget"]
    assert timed == [(name, threads) for name in ("aft_simple", "softmax", "identity") for _ in range(2)
                     for threads in (2, 1)]  # fmt: skip
    assert threads_trained == [2] * 4 + [1] * 4 and threads == [2]  # each run as timed; then as it was
    assert result["time_budget"] == 0.6
    markdown = (out / "report.md").read_text()
    assert "0.6 s of training per run" in markdown
    assert "| aft_simple |" in markdown and " | 12 | " in markdown and " | 4 | " in markdown
    assert "median of 5 steps timed just before it" in markdown
    assert "ranged 0.05–0.2 s a step around 0.05 s" in markdown
    softmax = result["mixers"]["softmax"]["runs"]
    assert [run["calibration"] for run in softmax] == [
        {"timed_steps": 5, "median_s": 0.2, "min_s": 0.2, "max_s": pytest.approx(0.8), "planned_steps": 3,
         "threads": 2, "median_s_by_threads": {"2": 0.2, "1": 0.4}},
        {"timed_steps": 5, "median_s": 0.1, "min_s": 0.1, "max_s": pytest.approx(0.4), "planned_steps": 6,
         "threads": 1, "median_s_by_threads": {"2": 0.4, "1": 0.1}},
    ]  # fmt: skip
    # A later compare of the same directory continues with the steps each run was given (no re-timing).
    speeds.update(aft_simple=[{2: 0.01, 1: 0.01}] * 2, softmax=[{2: 0.01, 1: 0.01}] * 2)
    again = compare(["aft_simple", "softmax"], **options)
    assert {name: [r["steps"] for r in run["runs"]] for name, run in again["mixers"].items()} == steps
    assert [run["calibration"] for run in again["mixers"]["softmax"]["runs"]] == [
        r["calibration"] for r in softmax
    ]
    assert len(timed) == 12
    # ... but not for another budget: those runs were not trained for it
    with pytest.raises(RunDirectoryError, match=r"aft_simple runs trained for --time-budget 0\.6"):
        compare(["aft_simple", "softmax"], **{**options, "time_budget": 5.0})
    before = (out / "compare.json").read_text()
    assert main(["compare", "--mixers", "aft_simple", "--out", str(out), "--time-budget", "5", "--quick",
                 "--data", str(user_text), "--seq-lens", "16"]) == 2  # fmt: skip
    assert "needs a new --out" in capsys.readouterr().err
    assert (out / "compare.json").read_text() == before


@pytest.mark.parametrize(
    "task,data,metric,named",
    [
        ("mqar", None, "test_acc", "key-value recall"),
        ("image-cls", "digits", "test_acc", "images: digits"),
        ("image-ar", "digits", "test_bpd", "images: digits"),
    ],
)
def test_compare_runs_other_tasks_with_their_metric(tmp_path, no_benchmark, task, data, metric, named):
    options = dict(quick=True, steps=2, seeds=2, task=task, data=data, seq_lens=[16], device="cpu")
    result = compare(["aft_simple", "lightconv"], out=tmp_path / "c", **options)
    assert result["metric"] == metric and result["task"] == task
    if metric == "test_acc":  # issue 37.2: the task's floor, above chance (MQAR's most frequent value)
        assert result["floor"] >= 1 / 32 and (task != "mqar" or result["floor"] > 0.1)
    markdown_lines = (tmp_path / "c" / "report.md").read_text()
    if task == "mqar":  # two steps stay on the plateau: the report says they did not learn it
        assert "did not rise above the task's floor" in markdown_lines
    for run in result["mixers"].values():
        assert [r["seed"] for r in run["runs"]] == [0, 1] and all(r[metric] >= 0 for r in run["runs"])
    if metric == "test_acc":  # higher is better: the best mean comes first
        means = [result["mixers"][name][metric] for name in ranking(result)]
        assert means == sorted(means, reverse=True) and all(0 <= m <= 1 for m in means)
    markdown = (tmp_path / "c" / "report.md").read_text()
    assert named in markdown and f"Task {task}" in markdown and LABELS[metric] in markdown


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--seeds", "0"], "seeds"),
        (["--time-budget", "0"], "time_budget"),
        (["--time-budget", "nan"], "time_budget"),
        (["--data", "no-such-file.txt"], "no-such-file.txt"),
        (["--task", "poetry"], "task must be one of"),
        (["--steps", "5", "--time-budget", "3"], "not both"),
        (["--mixers", "softmax,aft_simple,softmax"], "mixers name softmax more than once"),  # issue 38.10
    ],
)
def test_bad_compare_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "c"
    assert main(["compare", "--mixers", "softmax", "--quick", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


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
    options = dict(out=out, quick=True, steps=4, seeds=1, seq_lens=[32], device="cpu")
    monkeypatch.setattr(module, "train", train_and_signal)
    with pytest.raises(KeyboardInterrupt, match="aft_simple"):
        compare(["softmax", "aft_simple", "lightconv"], **options)
    assert not (out / "runs" / "lightconv").exists() and not (out / "compare.json").exists()
    finished = (out / "runs" / "softmax" / "seed-0" / "metrics.jsonl").read_text()
    if signum == signal.SIGINT:
        return  # resuming is the same for both signals; the benchmark makes it the slow half
    monkeypatch.setattr(module, "train", real_train)
    result = compare(["softmax", "aft_simple", "lightconv"], **options)
    assert (
        out / "runs" / "softmax" / "seed-0" / "metrics.jsonl"
    ).read_text() == finished  # reused, not retrained
    assert all(run["runs"][0]["curve"][-1][0] == 4 for run in result["mixers"].values())


def test_compare_interrupted_from_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    from tokenmix.bench import compare as module

    def interrupted(*args, **kwargs):
        raise module.CompareStopped("stopped while training softmax; run the same compare again to resume")

    monkeypatch.setattr(module, "_train_runs", interrupted)
    assert main(["compare", "--mixers", "softmax", "--quick", "--out", str(tmp_path / "c")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run the same compare again" in err


@pytest.mark.parametrize("below", [(), ("mqar",), ("mqar", "lr-0.001")])
def test_runs_of_another_budget_are_refused_naming_the_out_directory(tmp_path, below):
    """Issue 38.10: in a suite (runs under OUT/runs/TASK[/lr-X]) the message named OUT/runs."""
    from tokenmix.bench.compare import BUDGET_FILE, _earlier_budget

    out = tmp_path / "suite-out"
    runs = out.joinpath("runs", *below, "aft_simple")
    (runs / "seed-0").mkdir(parents=True)
    (runs / "seed-0" / "config.json").write_text("{}")
    (runs / BUDGET_FILE).write_text(json.dumps({"time_budget": 0.6}))
    with pytest.raises(RunDirectoryError, match=f"--out '{out}' holds aft_simple runs trained for"):
        _earlier_budget(runs, 5.0)


@pytest.mark.parametrize("positions", ["learned", "rope", "none"])
def test_every_mixer_gets_the_comparisons_positions(positions):
    """Issue 37.1: GAU and FLASH registered positions='none' (RoPE inside) while every other mixer got
    learned absolute positions, and that, not the mixing, decided the classification columns."""
    from tokenmix.bench.compare import BUDGETS, training_options
    from tokenmix.models import LanguageModel

    budget = replace(BUDGETS["quick"], positions=positions)
    for name in list_mixers():
        options = training_options(name, budget)
        model = LanguageModel(16, budget.dim, mixer=name, **options, max_len=32)
        rotary = [m for m in model.modules() if type(m).__name__ == "RotaryEmbedding"]
        learned = model.backbone.position_embedding is not None
        takes_rope = "rope" in mixer_info(name).options
        assert learned == (positions == "learned"), name
        assert bool(rotary) == (positions == "rope" and takes_rope), name


def test_compare_records_each_mixers_positions_and_learning_rate(tmp_path, no_benchmark, user_text):
    options = dict(quick=True, steps=2, seeds=1, data=str(user_text), seq_lens=[16], device="cpu")
    result = compare(["gau", "softmax"], out=tmp_path / "c", positions="rope", **options)
    assert {name: run["positions"] for name, run in result["mixers"].items()} == {
        "gau": "rope",
        "softmax": "rope",
        "identity": "none",  # the control takes no RoPE: nothing but its own token, as asked
    }
    assert all(run["lr"] > 0 for run in result["mixers"].values())
    assert "positions rope for every mixer" in (tmp_path / "c" / "report.md").read_text()


def test_mixers_not_told_apart_from_the_control_are_named():
    """Issue 37.2: a mixer learned the task only if it is told apart from identity (no mixing)."""
    from tokenmix.bench.report import like_the_control

    result = _result({"softmax": [0.95, 0.96, 0.97], "aft_simple": [0.35, 0.36, 0.345],
                      "identity": [0.35, 0.34, 0.36]}, metric="val_acc")  # fmt: skip
    assert like_the_control(result) == ["aft_simple"]
    assert "aft_simple not told apart from the control" in " ".join(summary(_with_costs(result)))
    two = _result({"softmax": [0.95, 0.96], "identity": [0.35, 0.34]}, metric="val_acc")
    assert like_the_control(two) == []  # two seeds test nothing: the first line says so


def test_a_run_trained_off_its_time_budget_is_flagged():
    """Issue 37.4: steps are set from a timing made before the run; a run the machine's load pushed more
    than 15 % off its budget is flagged in compare.json and named by the report."""
    from tokenmix.bench.compare import Measured, _Plan, _run_record
    from tokenmix.bench.report import off_budget

    plan = _Plan({}, Measured(params=1, tokens_per_step=100, seconds_per_step=0.1), time_budget=8.0)
    logged = [{"step": 40, "tokens_per_s": 1000.0, "val_bpc": 3.0, "val_loss": 2.0},
              {"step": 80, "tokens_per_s": 400.0, "val_bpc": 2.9, "val_loss": 1.9}]  # fmt: skip
    record = _run_record(logged, 0, "val_bpc", plan, None)  # 40·100/1000 + 40·100/400 = 14 s for 8
    assert record["train_seconds"] == pytest.approx(14.0) and record["off_budget"]
    on_time = _run_record([{**logged[0], "step": 80}], 1, "val_bpc", plan, None)  # 8 s for 8
    assert not on_time["off_budget"] and on_time["budget_seconds"] == 8.0
    result = {"mixers": {"softmax": {"runs": [record, on_time]}}}
    assert off_budget(result) == ["softmax seed 0 (14.0 s for 8)"]


def test_the_fastest_is_named_only_where_the_repeats_ranges_do_not_overlap():
    """Issue 37.4: a busy machine's noise must not crown a mixer; without ranges apart, none is named."""
    from tokenmix.bench.report import fastest_line

    def record(name, ms, low, high):
        return {"mixer": name, "pass": "fwd+bwd", "seq_len": 256, "ms": ms, "ms_min": low, "ms_max": high}

    apart = [record("flash", 3.0, 2.9, 3.2), record("aft_full", 5.0, 4.1, 6.0)]
    assert "**flash** (flash 3.0 ms (2.9–3.2), apart from every other)" in fastest_line(
        apart, ["flash", "aft_full"], 256
    )
    overlapping = [
        record("flash", 3.0, 2.9, 4.5),
        record("aft_full", 5.0, 4.1, 6.0),
        record("softmax", 9, 8, 10),
    ]
    line = fastest_line(overlapping, ["flash", "aft_full", "softmax"], 256)
    assert (
        "none named" in line
        and "flash 3.0 ms" in line
        and "aft_full 5.0 ms" in line
        and "softmax" not in line
    )
    assert "no mixer measured" in fastest_line([{**overlapping[0], "oom": True}], ["flash"], 256)


def test_the_control_is_never_named_fastest():
    """identity does no mixing: the fastest layer is named among the mixers one would choose from."""
    result = _with_costs(_result({"softmax": [3.0], "identity": [3.5]}))
    result["bench"] = [
        {"mixer": "identity", "pass": "fwd+bwd", "seq_len": 16, "ms": 0.3, "ms_min": 0.2, "ms_max": 0.4},
        {"mixer": "softmax", "pass": "fwd+bwd", "seq_len": 16, "ms": 3.0, "ms_min": 2.9, "ms_max": 3.1},
    ]
    assert "Fastest forward+backward at N=16: **softmax**" in " ".join(summary(result))

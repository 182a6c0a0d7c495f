import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    # Before anything imports triton (transformers does, for one), which reads it at import; the
    # kernels' own tests need it, and auto never interprets CPU tensors, so nothing else changes.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        from tests import interpreter

        interpreter.install()  # the same interpreter, faster (tests/interpreter.py)

# The mixers the tests register (tests/mixers/examples: the guide's worked example) join every all-mixer
# test: imported here, before any test module reads list_mixers() at its collection.
for _example in sorted((Path(__file__).parent / "mixers" / "examples").glob("[!_]*.py")):
    importlib.import_module(f"tests.mixers.examples.{_example.stem}")

settings.register_profile(
    "default",
    deadline=None,
    max_examples=int(os.environ.get("TOKENMIX_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile("default")
# One thread per pytest-xdist worker when the workers fill the cores: two workers of two threads each on
# two cores wait on each other's OpenMP spins (the suite ran about a fifth slower so).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


def pytest_configure(config: pytest.Config) -> None:
    """``-n N`` sends each test file to one pytest-xdist worker (``--dist loadfile``), so that a module-scoped
    fixture (the sharded torchrun, the trained compare) is built once, not once per worker; the suite
    measured 621 s so against 647–661 s with ``load``. An explicit other ``--dist`` is kept. The files go
    out in collection order (not most tests first), which ``pytest_collection_modifyitems`` sets."""
    config.addinivalue_line("markers", "starts_first: a long file, sent to a worker before the others")
    if getattr(config.option, "dist", None) == "load":
        config.option.dist = "loadfile"
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files marked ``starts_first`` (one long test each: the sm90 compile alone is a quarter of the
    suite's time on one core) run first, so that no worker is left with one of them while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("starts_first") is None)  # stable: order kept else


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory):
    """A prepared BPE dataset (512 tokens) of the embedded corpus's chapters, one JSONL line each."""
    from tokenmix.data.documents import embedded_documents
    from tokenmix.data.prepared import prepare

    root = tmp_path_factory.mktemp("bpe-data")
    lines = (json.dumps({"text": chapter.decode()}) for chapter in embedded_documents())
    (root / "chapters.jsonl").write_text("\n".join(lines) + "\n")
    return prepare(root / "chapters.jsonl", root / "prepared", tokenizer="bpe", vocab_size=512)


@pytest.fixture
def paced_steps(monkeypatch):
    """Training steps that take the seconds a test sets (``pace[mixer]``, or ``pace["*"]``) on a clock of
    their own: the trainer's time budget is then tested on what it plans, not on the machine's load."""
    from types import SimpleNamespace

    from tokenmix.training import trainer

    clock, pace = [0.0], {}
    real = trainer._Run.train_step

    def step(self, forward, trained):
        seconds = pace.get(self.config.mixer, pace.get("*"))
        clock[0] += seconds(self.step) if callable(seconds) else seconds
        return real(self, forward, trained)

    monkeypatch.setattr(trainer._Run, "train_step", step)
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    return pace

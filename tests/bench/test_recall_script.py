"""benchmarks/recall.py's bookkeeping, without training: a run a signal stopped is not a result."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "recall.py"


def _script():
    spec = importlib.util.spec_from_file_location("recall_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_run_stopped_short_of_its_steps_ends_the_sweep(tmp_path, monkeypatch):
    """The trainer saves and returns when a signal stops it; the sweep recorded such a run (gau at step
    91 of 600) as if it had trained all its steps."""
    script = _script()
    point = script.config_of("identity", 64, 64, 1e-3, 600, 4096, "learned", tmp_path)
    run_dir = Path(point["out"])
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 91, "val_acc": 0.1}) + "\n")
    monkeypatch.setattr(script, "train", lambda config: [{"step": 91, "val_acc": 0.1}])
    with pytest.raises(KeyboardInterrupt, match="stopped before step 600"):
        script.run(point)
    assert script.finished(run_dir, 91) and not script.finished(run_dir, 600)

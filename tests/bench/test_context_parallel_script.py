"""benchmarks/context_parallel.py on one tiny point: one process and two, the record's fields, the tensors
a step holds (at least its input's gradient), the bytes a split layer sends (none in one process; a
softmax ring's shares at two), and a user's file at --out left alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / "context_parallel.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_the_script_records_memory_time_and_bytes(tmp_path):
    out = tmp_path / "cp.json"
    result = _run("--mixers", "softmax", "--lens", "40", "--ranks", "1,2", "--repeats", "1", "--dim", "16",
                  "--mmap-threshold", "1048576", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["malloc_mmap_threshold"] == 1048576
    one, two = record["points"]
    assert (one["ranks"], two["ranks"]) == (1, 2) and one["bytes_sent_per_rank"] == 0
    # A step holds at least the gradient of its input, which it makes: (1 × 40 × 16) float32, a half each
    for point, length in ((one, 40), (two, 20)):
        assert point["tensor_peak_added_mib_per_rank"] * 2**20 >= length * 16 * 4
    # softmax passes its keys and values round the ring: (k, v) forward, (k, v, dk, dv) and then (dk, dv)
    # home backward, each (1 × 20 × 16) float32; and one all-reduce of one int64 (is any key or value
    # non-finite on some rank: none here, so no more)
    share = 20 * 16 * 4
    assert two["bytes_sent_per_rank"] == 2 * share + 4 * share + 2 * share + 8


def test_a_users_file_at_out_is_left_alone(tmp_path):
    out = tmp_path / "notes.json"
    out.write_text('{"mine": true}')
    result = _run("--mixers", "softmax", "--lens", "40", "--ranks", "1", "--out", str(out))
    assert result.returncode == 2 and "is not this script's record" in result.stderr
    assert out.read_text() == '{"mine": true}'

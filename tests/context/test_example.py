"""The guide's example of one mixer over a split sequence (docs/examples/split_sequence.py) runs as
written under torchrun with 2 processes and says its share equals the whole sequence's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_guide_example_runs_under_torchrun(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(ROOT / "docs" / "examples" / "split_sequence.py"), "--mixer", "flash", "--length", "300",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(
        r"flash: 2 ranks, rank 0 holds 150 of 300 positions; max \|split − whole\| = (\S+)", result.stdout
    )
    assert found is not None, result.stdout
    assert float(found.group(1)) < 1e-5

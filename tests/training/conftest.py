from __future__ import annotations

import pytest

# A small charlm configuration that trains in a few seconds on one CPU core.
TINY = {
    "task": "charlm",
    "mixer": "softmax",
    "mixer_options": {"heads": 2},
    "dim": 32,
    "depth": 2,
    "seq_len": 32,
    "batch_size": 8,
    "steps": 12,
    "eval_every": 5,
    "eval_batches": 2,
    "warmup_steps": 3,
    "progress": "log",
}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A charlm run trained long enough to get below the byte-unigram entropy (≈ 4.4 bits/byte)."""
    from tokenmix.training import train

    out = tmp_path_factory.mktemp("runs") / "charlm"
    config = dict(TINY, dim=64, steps=200, eval_every=50, warmup_steps=10, lr=3e-3, batch_size=16, seq_len=64)
    records = train(dict(config, out=str(out)))
    return out, records

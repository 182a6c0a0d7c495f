"""Run under torchrun by tests/training/test_sharding.py: train each job of a JSON list (argv[1]) in one
process group, so that the group's start-up is paid once for all of them.

A job is ``{"config": {...}, "stop_at": step or null}``; ``stop_at`` stops the run there as Ctrl-C would
(a checkpoint, then the loop ends)."""

from __future__ import annotations

import json
import os
import signal
import sys

import torch.distributed as dist

from tokenmix.training import train


def main() -> None:
    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)
    dist.init_process_group("gloo")  # the runs join it (and leave it to us), one rendezvous in all
    try:
        for job in jobs:
            stop_at = job.get("stop_at")

            def on_step(step: int, stop_at: int | None = stop_at) -> None:
                if step == stop_at:
                    os.kill(os.getpid(), signal.SIGINT)

            train(job["config"], on_step=on_step)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

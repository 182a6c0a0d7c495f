"""``python -m tokenmix.bench.worker``: measures benchmark points, one JSON line in on stdin and one out on
stdout per point. Each point runs in a child forked from this interpreter, which imported torch and
tokenmix once: its memory figures are its own, it may be killed for memory without taking the worker
with it, and it starts in milliseconds. (``multiprocessing``'s forkserver does the same but imports the
caller's ``__main__`` in every child, which runs a user's script that has no ``if __name__`` guard again.)
"""

import json
import os
import signal
import sys
import traceback

from torch.profiler import ProfilerActivity, profile

from .runner import run_point


def _child(point: dict, write: int) -> None:
    os.dup2(2, 1)  # stdout is the caller's channel: anything printed while measuring goes to stderr
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C ends the point being measured
    try:
        answer = {"record": run_point(point)}
    except Exception:  # a failing point is a library bug: its traceback goes to the caller
        answer = {"error": traceback.format_exc()}
    with os.fdopen(write, "w") as pipe:
        pipe.write(json.dumps(answer))


def main() -> None:
    # Ctrl-C reaches the caller, this worker and its child; the caller then closes stdin, which ends the
    # worker once the child has gone (a traceback from here would only repeat the caller's).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warm = False
    for line in sys.stdin:
        point = json.loads(line)
        if not warm and point["device"] == "cpu":
            # The profiler's first start takes a second and a half (measure.peak_allocated_mb uses it on
            # the CPU): paid once here, not in every child. Never on CUDA: nothing here may touch the
            # device before a fork.
            with profile(activities=[ProfilerActivity.CPU]):
                pass
            warm = True
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                _child(point, write)
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            text = pipe.read()
        exit_code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        answer = json.loads(text) if text else {}
        print(json.dumps({**answer, "exit": exit_code}), flush=True)


main()

"""``python -m tokenmix.hf.lm_eval [lm-eval arguments]``: lm-evaluation-harness's command line with
tokenmix's models registered with transformers' Auto classes and the bundled tasks included, so an
exported run evaluates offline::

    python -m tokenmix.hf.lm_eval --model hf --model_args pretrained=hf/demo \\
        --tasks tokenmix_heldout_cloze,tokenmix_heldout_bpb

``evaluate`` does the same from Python. Needs the ``lm-eval`` extra (``pip install 'tokenmix[lm-eval]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError, UnavailableError
from . import modeling  # noqa: F401  (registers the Auto classes)
from .lm_eval_tasks import TASKS_DIR

TASKS = ("tokenmix_heldout_cloze", "tokenmix_heldout_bpb")


def _harness():
    try:
        import lm_eval
    except ImportError as error:
        raise UnavailableError(
            f"lm-evaluation-harness is not installed: pip install 'tokenmix[lm-eval]' ({error})"
        ) from None
    return lm_eval


def evaluate(
    model_dir: str | Path, tasks: Sequence[str] = TASKS, *, limit: int | None = None, batch_size: int = 8
) -> dict[str, dict[str, Any]]:
    """Scores of an exported model (``tokenmix export``) on lm-eval ``tasks``: task → {metric: value}."""
    lm_eval = _harness()
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        limit=limit,
        batch_size=batch_size,
        device="cpu",
    )
    return results["results"]


def main(argv: Sequence[str] | None = None) -> None:
    """The harness's command line, with ``--include_path`` set to the bundled tasks unless given."""
    try:
        _harness()
    except InputError as error:  # one line and exit 2, as tokenmix's own commands do
        raise SystemExit(f"python -m tokenmix.hf.lm_eval: error: {error}") from None
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args:
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()

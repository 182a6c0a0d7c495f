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
from typing import Any, NoReturn

from ..errors import InputError, MissingFileError, UnavailableError
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
    _check_model_dir(model_dir)
    from lm_eval.tasks import TaskManager

    # The harness's own tasks are indexed only when asked for: their index reads ~15,000 task files
    # (about 10 s here), which the bundled tasks alone do not need.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(TASKS_DIR))
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        batch_size=batch_size,
        device="cpu",
    )
    return results["results"]


def _check_model_dir(model_dir: str | Path) -> None:
    """An exported model is a directory here: anything else would send transformers to the hub."""
    if not (Path(model_dir) / "config.json").is_file():
        raise MissingFileError(
            f"pretrained={str(model_dir)!r} is not a model directory (no config.json): give the directory "
            "that `tokenmix export` wrote"
        )


def _pretrained(args: Sequence[str]) -> str | None:
    """The ``pretrained=`` value of ``--model_args`` (``a=1,b=2`` or separate ``a=1 b=2`` words)."""
    if "--model_args" not in args:
        return None
    words = args[args.index("--model_args") + 1 :]
    for word in words:
        if word.startswith("--"):
            break
        for pair in word.split(","):
            key, _, value = pair.partition("=")
            if key.strip() == "pretrained":
                return value.strip()
    return None


def _fail(message: str) -> NoReturn:
    print(f"python -m tokenmix.hf.lm_eval: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """The harness's command line, with ``--include_path`` set to the bundled tasks unless given. Bad
    input it can name here (no harness, a model directory that is not there, an unknown task) ends in
    one line and exit 2, as tokenmix's own commands do."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        _harness()
        pretrained = _pretrained(args)
        if pretrained is not None:
            _check_model_dir(pretrained)
    except InputError as error:
        _fail(str(error))
    from lm_eval.__main__ import cli_evaluate

    if "--include_path" not in args:
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except ValueError as error:
        if not str(error).startswith("Tasks not found"):
            raise
        _fail(f"--tasks: {error} (bundled: {', '.join(TASKS)}; `lm-eval ls tasks` lists the harness's)")


if __name__ == "__main__":
    main()

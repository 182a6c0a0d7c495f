"""``tokenmix export``: a trained charlm run as a transformers directory (config, safetensors weights,
tokenizer files) that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load after
``import tokenmix.hf``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..errors import InvalidValueError, RunDirectoryError
from ..models import LanguageModel
from ..training.checkpoint import check_directory_path
from ..training.runs import load_run
from .modeling import TokenmixConfig, TokenmixForCausalLM
from .tokenizer import ByteTokenizer


def export_run(run_dir: str | Path, out: str | Path, weights: str = "best") -> Path:
    """Write the run's ``weights`` ("best" or "last") to ``out``, which must not exist yet or be empty
    (nothing is overwritten); the directory appears whole or not at all."""
    out = Path(out)
    check_directory_path(out)
    if out.exists() and any(out.iterdir()):
        raise RunDirectoryError(f"--out {str(out)!r} exists and is not empty; export writes a new directory")
    config, task, model = load_run(run_dir, weights)
    if not isinstance(model, LanguageModel):
        raise InvalidValueError(
            f"export takes a charlm run (a LanguageModel); {str(run_dir)!r} is {config.task!r}"
        )
    options = task._backbone_options()
    hf_config = TokenmixConfig(vocab_size=model.vocab_size, tie_word_embeddings=True, **options)
    hf_model = TokenmixForCausalLM(hf_config)
    hf_model.model.load_state_dict(model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        hf_model.save_pretrained(staging)
        ByteTokenizer().save_pretrained(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out

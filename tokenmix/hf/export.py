"""``tokenmix export``: a trained charlm run as a transformers directory (config, safetensors weights,
tokenizer files: tokenmix's byte tokenizer, or a BPE run's own as a fast tokenizer) that
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load after ``import tokenmix.hf``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..data.tokenizer import END_OF_TEXT, BPETokenizer, Tokenizer
from ..errors import InvalidValueError, RunDirectoryError
from ..models import LanguageModel
from ..training.checkpoint import check_directory_path
from ..training.runs import load_run
from .modeling import TokenmixConfig, TokenmixForCausalLM
from .tokenizer import ByteTokenizer


def export_run(run_dir: str | Path, out: str | Path, weights: str = "best") -> Path:
    """Write the run's ``weights`` ("best" or "last") to ``out``, which must not exist yet or be empty
    (nothing is overwritten); the directory appears whole or not at all."""
    out = _output_directory(Path(out))
    config, task, model = load_run(run_dir, weights)
    if config.task != "charlm" or not isinstance(model, LanguageModel):
        raise InvalidValueError(
            f"export takes a charlm run (a language model of text, which the exported tokenizer reads); "
            f"{str(run_dir)!r} is a {config.task!r} run, whose tokens are not text"
        )
    options = task._backbone_options()
    tokenizer = hf_tokenizer(task.tokenizer)
    hf_config = TokenmixConfig(
        vocab_size=model.vocab_size, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, **options
    )
    hf_model = TokenmixForCausalLM(hf_config)
    hf_model.model.load_state_dict(model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerBase:
    """The transformers tokenizer with ``tokenizer``'s encodings: ``ByteTokenizer``, or for BPE a fast
    tokenizer whose end-of-text token is also its beginning (the harness's prefix) and padding."""
    if isinstance(tokenizer, BPETokenizer):
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.tokenizer,
            bos_token=END_OF_TEXT,
            eos_token=END_OF_TEXT,
            pad_token=END_OF_TEXT,
            padding_side="left",
            split_special_tokens=True,  # "<|endoftext|>" written in a text is text, as in tokenmix
        )
    return ByteTokenizer()


def _output_directory(out: Path) -> Path:
    """Where to write: ``out``, or the empty directory a symlink ``out`` points to; refused if it holds
    anything or is a link to nothing (a user's file, never replaced)."""
    if out.is_symlink():
        if not out.exists():
            raise RunDirectoryError(
                f"--out {str(out)!r} is a symlink to nothing; export writes a new directory"
            )
        out = out.resolve()
    check_directory_path(out)
    if out.exists() and any(out.iterdir()):
        raise RunDirectoryError(f"--out {str(out)!r} exists and is not empty; export writes a new directory")
    return out

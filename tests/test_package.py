"""The package itself (tokenmix/__init__.py): what ``import tokenmix`` loads."""

from __future__ import annotations


def test_import_tokenmix_leaves_training_until_it_is_used():
    """Issue 40.4: the mixers alone do not pay for training's imports (torch.distributed's checkpointing
    took about a second on top of torch); ``tokenmix.train`` and the subpackages load when first used."""
    import subprocess
    import sys

    code = (
        "import sys, tokenmix\n"
        "heavy = [m for m in sys.modules if m.startswith(('tokenmix.training', 'tokenmix.cli', "
        "'tokenmix.bench', 'torch.distributed.checkpoint'))]\n"
        "assert not heavy, heavy\n"
        "assert tokenmix.train.__module__ == 'tokenmix.training.trainer'\n"
        "assert tokenmix.training.generate and 'tokenmix.training' in sys.modules\n"
        "try:\n    tokenmix.no_such_thing\nexcept AttributeError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "no attribute 'no_such_thing'" in done.stdout

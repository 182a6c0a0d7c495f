from __future__ import annotations

import pytest
import torch

from tests.reference import assert_close, decode
from tokenmix.cli import main
from tokenmix.models import create_model, list_presets

NAMES = [preset.name for preset in list_presets()]


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_builds(name):
    with torch.device("meta"):
        model = create_model(name, vocab_size=100)
    blocks = model.backbone.blocks
    if "flash" in name:  # GAU stacks: no FFN, two GAU layers per Transformer layer
        assert all(block.ffn is None for block in blocks) and len(blocks) % 2 == 0
        assert model.backbone.position_embedding is None and blocks[0].mixer.rotary is not None


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("-small")])
def test_small_presets_run_and_decode(name):
    torch.manual_seed(0)
    model = create_model(
        name,
        vocab_size=50,
        depth=2,
        **({"mixer_options": {"chunk_size": 4}} if name == "flash-small" else {}),
    )
    model.eval()
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        logits = model(tokens)
    assert_close(decode(model, tokens)[0], logits, 1e-5)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known presets: transformer-small"):
        create_model("flash-huge")


def test_presets_command(capsys):
    assert main(["presets", "-v"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out
    assert "M params" in out and "'ffn': False" in out

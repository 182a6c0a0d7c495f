"""tokenmix mixers inside timm's models (tokenmix.timm). These run in CI's second environment (torch
2.14.1 with torchvision 0.29.1 and timm, see .ci/run); without timm they are skipped."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import tokenmix  # noqa: E402
import tokenmix.timm  # noqa: E402
from tokenmix.errors import InvalidTypeError, InvalidValueError  # noqa: E402
from tokenmix.timm import attn_layer, bind_grid  # noqa: E402


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mixer", tokenmix.list_mixers())
def test_vit_tiny_with_each_mixer_trains_a_step(mixer, images):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, attn_layer=attn_layer(mixer))
    bind_grid(model)
    layers = [block.attn for block in model.blocks]
    assert all(layer.mixer.mixer_name == mixer for layer in layers)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([3, 7]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    mixer_names = [name for name in before if ".attn.mixer." in name]
    assert mixer_names  # the mixer's parameters are the model's
    changed = [name for name in mixer_names if not torch.equal(before[name], model.get_parameter(name))]
    assert len(changed) == len(mixer_names), sorted(set(mixer_names) - set(changed))


def test_a_timm_checkpoint_loads_strictly_into_the_softmax_layer_and_gives_timms_outputs(images):
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    ours = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, attn_layer=attn_layer("softmax")
    ).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("mixer", "qkv_bias", "proj_bias", "qk_norm"),
    [
        ("softmax", False, True, False),
        ("softmax", True, False, True),
        ("pointwise", False, False, True),  # pointwise keeps its qk-layernorm: a timm qk_norm checkpoint
        ("pointwise", True, True, True),
    ],
)
def test_timms_attention_arguments_map_onto_the_mixer(mixer, qkv_bias, proj_bias, qk_norm):
    """timm's Attention and ours, built with the same arguments, have the same parameters under timm's
    names; for softmax the outputs agree, for pointwise they are its op over the same q, k, v."""
    from functools import partial

    from timm.layers import Attention

    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    arguments = {"num_heads": 4, "qkv_bias": qkv_bias, "proj_bias": proj_bias, "qk_norm": qk_norm,
                 "norm_layer": norm}  # fmt: skip
    torch.manual_seed(0)
    theirs = Attention(32, **arguments).double().eval()
    for p in theirs.parameters():  # not timm's constant initial norms and zero biases
        torch.nn.init.normal_(p)
    ours = attn_layer(mixer)(32, **arguments, dtype=torch.float64).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert (ours.mixer.to_qkv.bias is None) == (not qkv_bias) and (ours.mixer.to_out.bias is None) == (
        not proj_bias
    )
    if qk_norm:
        assert ours.mixer.q_norm.eps == 1e-6  # timm's norm_layer, not tokenmix's default
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        if mixer == "softmax":
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
        else:
            qkv = theirs.qkv(x).reshape(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
            q, k, v = theirs.q_norm(qkv[0]), theirs.k_norm(qkv[1]), qkv[2]
            attended = tokenmix.functional.pointwise_attention(q, k, v).transpose(1, 2).reshape(2, 10, 32)
            torch.testing.assert_close(ours(x), theirs.proj(attended), rtol=1e-10, atol=1e-10)


def test_aft_conv_gets_the_patch_grid_behind_class_and_register_tokens():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        reg_tokens=4,
        attn_layer=attn_layer("aft_conv", kernel_size=3),
    )
    bind_grid(model)
    images = torch.randn(1, 3, 224, 224)
    tokens = model.patch_embed(images)
    tokens = model._pos_embed(tokens)  # class, then 4 register tokens, then 196 patches
    assert tokens.shape[1] == 201
    layer = model.blocks[0].attn
    with torch.no_grad():
        out = layer(tokens)
        assert layer.mixer.grid == (14, 14)
        patches = tokens[:, 5:]
        # the patches are mixed on the 14 × 14 grid, as the 2-D op does, and never see the prefix
        torch.testing.assert_close(out[:, 5:], layer.mixer(patches), rtol=0, atol=0)
        shuffled = tokens.clone()
        shuffled[:, :5] = torch.randn_like(shuffled[:, :5])
        torch.testing.assert_close(layer(shuffled)[:, 5:], out[:, 5:], rtol=0, atol=0)
        # each prefix token gets the mean of the patches' outputs
        torch.testing.assert_close(out[:, :5], out[:, 5:].mean(1, keepdim=True).expand(-1, 5, -1))
        # the same as aft_conv built on the 14 × 14 grid itself
        alone = tokenmix.create_mixer("aft_conv", 192, heads=3, kernel_size=3, grid=(14, 14))
        alone.load_state_dict(layer.mixer.state_dict())
        torch.testing.assert_close(out[:, 5:], alone(patches), rtol=0, atol=0)
    assert model(images).shape == (1, 1000)


def test_aft_conv_without_a_class_token_is_the_papers_set_up_and_a_fixed_grid_is_kept():
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, class_token=False, global_pool="avg",
        attn_layer=attn_layer("aft_conv", grid=(14, 14)),
    )  # fmt: skip
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    layer = attn_layer("aft_conv", grid=(4, 2))(16, num_heads=2)
    with pytest.raises(InvalidValueError, match="fewer than the grid"):
        layer(torch.randn(1, 7, 16))


@pytest.mark.parametrize("dynamic", [False, True])
def test_aft_conv_on_a_non_square_image_uses_the_models_grid(dynamic):
    """Issue 38.9: a 64 × 96 image's 4 × 6 patches and its class token (25 tokens) were mixed on a
    guessed 5 × 5 grid with the class token as a patch."""
    torch.manual_seed(0)
    options = {"dynamic_img_size": True} if dynamic else {"img_size": (64, 96)}
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, attn_layer=attn_layer("aft_conv", kernel_size=3), **options
    ).eval()
    images = torch.randn(2, 3, 64, 96)
    with pytest.raises(InvalidValueError, match=r"bind_grid\(model\)"):
        model(images)
    bind_grid(model)
    layer = model.blocks[0].attn
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(images))
        assert tokens.shape[1] == 25
        out = layer(tokens)
        assert layer.mixer.grid == (4, 6)
        alone = tokenmix.create_mixer("aft_conv", 192, heads=3, kernel_size=3, grid=(4, 6))
        alone.load_state_dict(layer.mixer.state_dict())
        torch.testing.assert_close(out[:, 1:], alone(tokens[:, 1:]), rtol=0, atol=0)
        assert model(images).shape == (2, 1000)
        if dynamic:  # another image size, another grid, in the same model
            model(torch.randn(1, 3, 96, 32))
            assert layer.mixer.grid == (6, 2)


def test_a_model_with_tokenmix_layers_pickles_and_deep_copies(tmp_path, monkeypatch):
    """Issue 38.9: torch.save(model) failed: attn_layer's classes, made with type(), could not be found
    by name."""
    import copy

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=(32, 48), patch_size=16, depth=2,
        attn_layer=attn_layer("aft_conv", kernel_size=3),
    ).eval()  # fmt: skip
    bind_grid(model)
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        expected = model(images)
    torch.save(model, tmp_path / "model.pt")
    monkeypatch.setattr(tokenmix.timm, "_CLASSES", {})  # as in a fresh process: rebuilt from the name
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (loaded, copy.deepcopy(model)):
        assert type(other.blocks[0].attn).__name__ == "AftConvTimmAttention"
        with torch.no_grad():
            torch.testing.assert_close(other(images), expected, rtol=0, atol=0)


def test_key_padding_and_causal_masks_reach_the_mixer():
    torch.manual_seed(0)
    layer = attn_layer("pointwise", causal=True)(16, num_heads=2).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        expected = layer.mixer(x, mask)
        torch.testing.assert_close(layer(x, attn_mask=mask, is_causal=True), expected, rtol=0, atol=0)
        torch.testing.assert_close(layer(x, mask[:, None, None], is_causal=True), expected, rtol=0, atol=0)
    with pytest.raises(InvalidValueError, match="is_causal=False"):
        layer(x)
    with pytest.raises(InvalidValueError, match="attn_mask must be a key-padding mask"):
        layer(x, torch.ones(2, 1, 6, 6, dtype=torch.bool), is_causal=True)
    with pytest.raises(InvalidTypeError, match="attn_mask must be None or a bool"):
        layer(x, torch.zeros(2, 6), is_causal=True)


def test_construction_on_the_meta_device_and_in_another_dtype():
    layer = attn_layer("flash", chunk_size=4)(16, device="meta")
    assert {p.device.type for p in layer.parameters()} == {"meta"}
    layer = attn_layer("lightconv", kernel_size=3)(16, num_heads=2, dtype=torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert layer.mixer.heads == 2  # num_heads → heads


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: attn_layer("softmax", window=3), InvalidTypeError, "unknown option"),
        (lambda: attn_layer("nope"), InvalidValueError, "unknown mixer 'nope'"),
        (lambda: attn_layer("softmax")(16, num_heads=2, attn_drop=0.1), InvalidValueError, "attn_drop"),
        (lambda: attn_layer("softmax")(16, num_heads=2, dim_out=8), InvalidValueError, "dim_out"),
        (lambda: attn_layer("softmax")(16, num_heads=2, gated=True), InvalidValueError, "gated"),
        (lambda: attn_layer("aft_simple")(16, qk_norm=True), InvalidValueError, "qk_norm"),
        (lambda: attn_layer("aft_simple")(16, attn_head_dim=4), InvalidValueError, "attn_head_dim"),
        (lambda: attn_layer("softmax")(16, num_heads=2, depth=3), InvalidTypeError, "depth"),
    ],
)
def test_what_has_no_counterpart_is_refused_naming_it(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_the_guides_timm_snippet_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    blocks = re.findall(r"```python timm\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "docs/guide.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 1000)

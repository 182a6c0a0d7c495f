"""What "aft_full", "aft_simple" and "aft_local" add on top of the shared suite (Zhai et al. 2021)."""

from __future__ import annotations

import pytest
import torch

from tests.reference import assert_close, decode
from tokenmix import create_mixer
from tokenmix.functional import aft_conv, aft_full, aft_local
from tokenmix.models import VisionTransformer


def test_modules_are_the_ops_between_their_projections():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    full = create_mixer("aft_full", 16, max_len=12, bias_rank=3, causal=True)
    q, k, v = full.to_q(x), full.to_k(x), full.to_v(x)
    w = full.bias.u @ full.bias.v.T
    assert_close(full(x), full.to_out(aft_full(q, k, v, w[:9, :9], causal=True)), 1e-6)
    local = create_mixer("aft_local", 16, max_len=12, bias_rank=3, window=3)
    q, k, v = local.to_q(x), local.to_k(x), local.to_v(x)
    w = local.bias.u @ local.bias.v.T
    assert_close(local(x), local.to_out(aft_local(q, k, v, w, window=3)), 1e-6)


@pytest.mark.parametrize("name", ["aft_full", "aft_local"])
def test_longer_than_max_len_names_it(name):
    mixer = create_mixer(name, 8, max_len=5, causal=True)
    with pytest.raises(ValueError, match="max_len=5"):
        mixer(torch.randn(1, 6, 8))
    state = mixer.init_state(1)
    for _ in range(5):
        _, state = mixer.step(torch.randn(1, 8), state)
    with pytest.raises(ValueError, match="max_len=5"):
        mixer.step(torch.randn(1, 8), state)


def test_decoding_state_sizes():
    torch.manual_seed(0)
    x = torch.randn(2, 30, 16)
    sizes = {}
    for name, options in (("aft_simple", {}), ("aft_local", {"window": 4}), ("aft_full", {})):
        mixer = create_mixer(name, 16, causal=True, **options)
        state, sizes[name] = mixer.init_state(2), []
        with torch.no_grad():
            for t in range(30):
                _, state = mixer.step(x[:, t], state)
                sizes[name].append(state.nbytes())
    assert len(set(sizes["aft_simple"])) == 1  # running max, numerator, denominator: O(d)
    assert len(set(sizes["aft_local"][4:])) == 1  # once the window is full: O(s·d)
    # A cache of every past key and value: 2 tensors · B · t · d float32 after t steps.
    assert sizes["aft_full"] == [2 * 2 * t * 16 * 4 for t in range(1, 31)]


@pytest.mark.parametrize("name", ["aft_simple", "aft_local", "aft_full"])
def test_decoding_long_sequences_with_large_keys(name):
    """Steps agree with the forward when keys reach the hundreds (running maxima keep sums finite)."""
    torch.manual_seed(0)
    mixer = create_mixer(name, 8, causal=True, **({"window": 3} if name == "aft_local" else {}))
    with torch.no_grad():
        mixer.to_k.weight.mul_(200)
        x = torch.randn(1, 40, 8)
        full = mixer(x)
    assert torch.isfinite(full).all()
    assert_close(decode(mixer, x)[0], full, 1e-4)


@pytest.mark.parametrize("name", ["aft_full", "aft_local"])
def test_a_full_bias_table_instead_of_factors(name):
    torch.manual_seed(0)
    mixer = create_mixer(name, 16, max_len=10, bias_rank=None, causal=True)
    assert mixer.bias.table.shape == (10, 10) and not hasattr(mixer.bias, "u")
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        assert_close(decode(mixer, x)[0], mixer(x), 1e-5)
    mixer(x).sum().backward()
    assert mixer.bias.table.grad[:8, :8].abs().sum() > 0


def test_aft_conv_reparametrisation_starts_at_zero():
    mixer = create_mixer("aft_conv", 16, heads=4, kernel_size=5)
    assert torch.equal(mixer.weight(), torch.zeros(4, 5))  # γ = β = 0
    with torch.no_grad():
        mixer.gamma.fill_(1.0)
        mixer.beta.fill_(0.5)
    weight = mixer.weight()
    assert torch.allclose(weight.mean(-1), torch.full((4,), 0.5), atol=1e-6)
    assert torch.allclose(weight.std(-1, unbiased=False), torch.ones(4), atol=1e-4)


@pytest.mark.parametrize("kernel_size", [1, 2, 5])
def test_aft_conv_decodes_with_a_nonzero_kernel(kernel_size):
    torch.manual_seed(0)
    mixer = create_mixer("aft_conv", 16, heads=4, kernel_size=kernel_size, causal=True)
    with torch.no_grad():
        mixer.gamma.normal_()
        mixer.beta.normal_()
        x = torch.randn(2, 12, 16)
        steps, state = decode(mixer, x)
        assert_close(steps, mixer(x), 1e-5)
    assert state.keys.shape[1] == kernel_size - 1  # constant: the window, plus O(d) running sums


@pytest.mark.parametrize(
    "options,message",
    [
        ({"kernel_size": 4}, "kernel_size must be odd"),
        ({"heads": 3}, "heads=3 must divide hidden_dim=16"),
    ],
)
def test_aft_conv_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        create_mixer("aft_conv", 16, **options)
    assert create_mixer("aft_conv", 16, kernel_size=4, causal=True).kernel_size == 4


def test_aft_conv_on_a_grid_is_the_2d_op():
    torch.manual_seed(0)
    mixer = create_mixer("aft_conv", 16, heads=4, kernel_size=3, grid=(3, 5))
    with torch.no_grad():
        mixer.gamma.normal_()
        mixer.beta.normal_()
    assert mixer.weight().shape == (4, 3, 3)
    x = torch.randn(2, 15, 16)
    q, k, v = mixer.to_q(x), mixer.to_k(x), mixer.to_v(x)
    grid = lambda t: t.unflatten(1, (3, 5))  # noqa: E731
    out = aft_conv(grid(q).unflatten(-1, (4, 4)), grid(k), grid(v).unflatten(-1, (4, 4)), mixer.weight())
    assert_close(mixer(x), mixer.to_out(out.flatten(-2).flatten(1, 2)), 1e-6)
    with pytest.raises(ValueError, match=r"grid \(3, 5\): 15 positions, got \(14,\)"):
        mixer(x[:, :14])


def test_aft_conv_on_a_grid_packs_whole_grids():
    """A packed row of grids (cu_seqlens, one grid a segment) equals each grid alone; a segment that is
    not one grid is named."""
    torch.manual_seed(0)
    mixer = create_mixer("aft_conv", 16, heads=4, kernel_size=3, grid=(2, 3))
    with torch.no_grad():
        mixer.gamma.normal_()
    x = torch.randn(1, 18, 16)
    packed = mixer(x, cu_seqlens=torch.tensor([0, 6, 12, 18]))
    assert_close(packed, mixer(x.view(3, 6, 16)).view(1, 18, 16), 1e-6)
    with pytest.raises(ValueError, match=r"every packed segment must hold the grid \(2, 3\): 6 positions"):
        mixer(x, cu_seqlens=torch.tensor([0, 6, 11, 18]))


@pytest.mark.parametrize(
    "options,message",
    [({"grid": (2, 2), "causal": True}, "bidirectional only"), ({"grid": (2, 2), "kernel_size": 4}, "odd")],
)
def test_aft_conv_grid_options(options, message):
    with pytest.raises(ValueError, match=message):
        create_mixer("aft_conv", 16, heads=4, **options)


def test_vision_transformer_runs_aft_conv_on_the_patch_grid():
    model = VisionTransformer(
        12,
        4,
        10,
        in_channels=1,
        dim=16,
        depth=2,
        mixer="aft_conv",
        pool="mean",
        mixer_options={"heads": 4, "kernel_size": 3},
    )
    assert model.cls_token is None
    assert all(block.mixer.grid == (3, 3) for block in model.backbone.blocks)
    assert model(torch.randn(2, 1, 12, 12)).shape == (2, 10)


@pytest.mark.parametrize("name", ["aft_full", "aft_simple", "aft_local", "aft_conv"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_stay_finite_with_large_keys(name, causal):
    """to_k scaled ×40 puts keys in the hundreds: every parameter's float32 gradient is finite and
    within 1e-3 of the float64 module's."""
    torch.manual_seed(0)
    options = {"aft_full": {"max_len": 48}, "aft_local": {"max_len": 48}}.get(name, {})
    mixer = create_mixer(name, 16, causal=causal, **options)
    with torch.no_grad():
        mixer.to_k.weight.mul_(40)
    wide = mixer.double()
    x = torch.randn(2, 48, 16, dtype=torch.float64)
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[1, :5] = False
    grad = torch.randn(2, 48, 16, dtype=torch.float64) * mask[..., None]
    wide(x, attention_mask=mask).backward(grad)
    want = {n: p.grad.clone() for n, p in wide.named_parameters()}
    narrow = wide.float()
    narrow.zero_grad()
    narrow(x.float(), attention_mask=mask).backward(grad.float())
    floor = 1e-3 * torch.cat([g.flatten() for g in want.values()]).norm().item()
    for n, p in narrow.named_parameters():
        assert_close(p.grad, want[n], 1e-3, floor=floor, what=f"{name} grad {n}")

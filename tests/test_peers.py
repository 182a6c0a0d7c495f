"""Where a peer implementation breaks and ours does not."""

from __future__ import annotations

import pytest
import torch
from aft_pytorch import AFTFull, AFTSimple

from tokenmix import create_mixer


def copy_weights(peer: torch.nn.Module, ours: torch.nn.Module) -> None:
    """Give our module the peer's projections."""
    for name in ("to_q", "to_k", "to_v"):
        getattr(ours, name).load_state_dict(getattr(peer, name).state_dict())
    ours.to_out.load_state_dict(peer.project.state_dict())


@pytest.mark.parametrize("peer_cls,name", [(AFTFull, "aft_full"), (AFTSimple, "aft_simple")])
def test_large_keys(peer_cls, name):
    """The peer's AFT-full takes exp(K) unshifted and overflows to inf/inf; its AFT-simple is a softmax
    and stays finite. Ours stays finite and accurate in both."""
    torch.manual_seed(0)
    peer = peer_cls(max_seqlen=16, dim=8, hidden_dim=8)
    ours = create_mixer(name, 8, hidden_dim=8, **({"max_len": 16} if name == "aft_full" else {}))
    copy_weights(peer, ours)
    if name == "aft_full":  # the same biases: ours factorised, the peer's a table
        with torch.no_grad():
            peer.wbias.copy_(ours.bias.u @ ours.bias.v.T)
    x = torch.randn(2, 16, 8)
    # Ordinary inputs: both agree, so the comparison is of the same layer.
    torch.testing.assert_close(ours(x), peer(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        peer.to_k.weight.mul_(100)
        ours.to_k.weight.mul_(100)  # keys of a few hundred: exp overflows float32
    assert torch.isfinite(ours(x)).all()
    if name == "aft_full":
        assert not torch.isfinite(peer(x)).all()
    else:
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-4, atol=1e-5)

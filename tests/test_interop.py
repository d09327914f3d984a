"""minimoe <-> Hugging Face MixtralSparseMoeBlock: same weights, same numbers."""

import importlib
import sys

import pytest
import torch

from minimoe import MoE, MoEConfig, interop
from minimoe.routing import GWBroadcast, TopK, TopP

SKIP = "the Mixtral parity tests need transformers>=5: install the bench extra: pip install -e '.[bench]'"


@pytest.fixture
def block():
    """A small Mixtral block (d 32, h 64, 8 experts, top-2), initialised with a seeded generator."""
    transformers = pytest.importorskip("transformers", minversion="5", reason=SKIP)
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_local_experts=8,
        num_experts_per_tok=2,
        experts_implementation="eager",
    )
    block = MixtralSparseMoeBlock(config)  # parameters hold uninitialised memory
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return block


def test_outputs_and_router_logits_agree(block):
    moe = interop.from_mixtral(block)
    assert (moe.config.router, moe.config.d_hidden, moe.config.num_experts) == (TopK(k=2), 64, 8)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))  # (B, L, d)
    moe.eval(), block.eval()
    with torch.no_grad():
        ours = moe(x)
        theirs = block(x.clone())
        hf_logits = block.gate(x)[0]  # (B*L, E)
    torch.testing.assert_close(ours.output, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.routing.logits, hf_logits, atol=1e-6, rtol=0)
    assert ours.output.abs().max() > 0.1  # not a trivially zero comparison


def test_round_trips_keep_weights(block):
    back = interop.to_mixtral(interop.from_mixtral(block))
    for name, p in block.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    moe = MoE(MoEConfig(d_model=16, d_hidden=24, num_experts=4, router=TopK(k=1)))
    again = interop.from_mixtral(interop.to_mixtral(moe))
    assert again.config.router == TopK(k=1)
    for name, p in moe.state_dict().items():
        assert torch.equal(again.state_dict()[name], p), name


def test_gradients_agree(block):
    moe = interop.from_mixtral(block)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    moe(x).output.sum().backward()
    block(x.clone()).sum().backward()
    for ours, theirs in (
        (moe.gate.weight, block.gate.weight),
        (moe.experts.gate_up, block.experts.gate_up_proj),
        (moe.experts.down, block.experts.down_proj),
    ):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change",
    [
        {"router": TopP()},
        {"router": TopK(renormalize=False)},
        {"activation": "gelu"},
        {"capacity_factor": 1.25},
        {"shared_hidden": 16},  # Mixtral has no shared expert
        {"router": GWBroadcast(TopK(), threshold=0.5)},
    ],
)
def test_inexpressible_moe_raises(change):
    name = next(iter(change))
    with pytest.raises(
        ValueError, match=name
    ):  # router=... or activation=... or capacity_factor=...
        interop.to_mixtral(MoE(MoEConfig(d_model=8, d_hidden=16, num_experts=4, **change)))


def test_inexpressible_block_or_config_raises(block):
    block.jitter_noise = 0.01  # training-time input noise: no minimoe counterpart
    with pytest.raises(ValueError, match="jitter"):
        interop.from_mixtral(block)
    moe = MoE(MoEConfig(d_model=32, d_hidden=64, num_experts=8, router=TopK(k=1)))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        interop.to_mixtral(moe, block.experts.config)  # a top-2 config for a top-1 MoE


def test_imports_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    module = importlib.reload(interop)
    with pytest.raises(ImportError, match=r"bench"):
        module.to_mixtral(MoE(MoEConfig(d_model=8, d_hidden=16, num_experts=4)))

"""minimoe <-> Hugging Face sparse MoE blocks (Mixtral, OLMoE, Qwen2-MoE, DeepSeek-V3): same
weights, same routing, same numbers."""

import copy
import importlib
import sys

import pytest
import torch
from torch import nn

from minimoe import MoE, MoEConfig, interop
from minimoe.routing import GWBroadcast, SigmoidTopK, TopK, TopP

SKIP = (
    "the HF parity tests need transformers>=5: install the bench extra: pip install -e '.[bench]'"
)

# DeepSeek-V3 with n_shared_experts=0 (a block without shared expert) builds empty nn.Linears
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

# family -> (config class, block class, config fields): d 32, 8 routed experts, top-2
HF = {
    "mixtral": ("MixtralConfig", "mixtral.MixtralSparseMoeBlock",
                {"intermediate_size": 64, "num_local_experts": 8}),
    "olmoe": ("OlmoeConfig", "olmoe.OlmoeSparseMoeBlock",
              {"intermediate_size": 64, "num_experts": 8, "norm_topk_prob": False}),
    "qwen2_moe": ("Qwen2MoeConfig", "qwen2_moe.Qwen2MoeSparseMoeBlock",
                  {"moe_intermediate_size": 64, "num_experts": 8, "norm_topk_prob": False,
                   "shared_expert_intermediate_size": 48}),
    "qwen2_moe-norm": ("Qwen2MoeConfig", "qwen2_moe.Qwen2MoeSparseMoeBlock",
                       {"moe_intermediate_size": 64, "num_experts": 8, "norm_topk_prob": True,
                        "shared_expert_intermediate_size": 48}),
    "deepseek_v3": ("DeepseekV3Config", "deepseek_v3.DeepseekV3MoE",
                    {"moe_intermediate_size": 32, "n_routed_experts": 8, "n_group": 4,
                     "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                     "n_shared_experts": 2}),
    "deepseek_v3-ungrouped": ("DeepseekV3Config", "deepseek_v3.DeepseekV3MoE",
                              {"moe_intermediate_size": 32, "n_routed_experts": 8, "n_group": 1,
                               "topk_group": 1, "norm_topk_prob": False,
                               "routed_scaling_factor": 1.5, "n_shared_experts": 0}),
}  # fmt: skip

# family -> a minimoe MoE it can express, of other sizes than HF's (d 16, h 24, 4 experts)
EXPRESSIBLE = {
    "mixtral": {"router": TopK(k=1, renormalize=True)},
    "olmoe": {"router": TopK(k=2, renormalize=False)},
    "qwen2_moe": {"router": TopK(k=2, renormalize=False), "shared_hidden": 40, "shared_gate": True},
    "deepseek_v3": {
        "router": SigmoidTopK(k=2, n_group=2, topk_group=1, scaling=2.5),
        "shared_hidden": 48,  # two shared experts of width 24
    },
}


def hf_config(family: str):
    transformers = pytest.importorskip("transformers", minversion="5", reason=SKIP)
    config_cls, _, fields = HF[family]
    return getattr(transformers, config_cls)(
        hidden_size=32, num_experts_per_tok=2, experts_implementation="eager", **fields
    )


def hf_block(family: str, **changes) -> nn.Module:
    """A small block of ``family`` with every parameter and buffer random (the router bias too);
    ``changes`` set fields of its config first."""
    config = hf_config(family)
    for name, value in changes.items():
        setattr(config, name, value)
    module, cls = HF[family][1].split(".")
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    block = getattr(modeling, cls)(config)  # the experts hold uninitialised memory
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*block.parameters(), *block.buffers()]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return block


@pytest.fixture(params=list(HF))
def block(request):
    return hf_block(request.param)


def minimoe_moe(family: str) -> MoE:
    moe = MoE(MoEConfig(d_model=16, d_hidden=24, num_experts=4, **EXPRESSIBLE[family]))
    for b in moe.router_state.buffers():  # DeepSeek-V3's bias: nonzero, so the copy shows
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    return moe


def dense(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's own routing as (T, E) mask and combine weights, from its gate's output."""
    _, weights, idx = block.gate(x)  # (T, k) each
    E = block.experts.gate_up_proj.shape[0]
    mask = torch.zeros(idx.shape[0], E, dtype=torch.bool).scatter_(1, idx, True)
    return mask, torch.zeros(idx.shape[0], E).scatter_(1, idx, weights.float())


def test_outputs_and_routing_agree(block):
    moe = interop.from_hf(block)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))  # (B, L, d)
    moe.eval(), block.eval()
    with torch.no_grad():
        ours = moe(x)
        theirs = block(x.clone())
        mask, weights = dense(block, x.reshape(-1, 32))
    torch.testing.assert_close(ours.output, theirs, atol=1e-5, rtol=0)
    assert torch.equal(ours.routing.mask, mask)
    torch.testing.assert_close(ours.routing.weights, weights, atol=1e-6, rtol=0)
    assert ours.output.abs().max() > 0.1  # not a trivially zero comparison


def test_families_map_to_minimoe_settings():
    expected = {
        "mixtral": (TopK(k=2), 0, False),
        "olmoe": (TopK(k=2, renormalize=False), 0, False),
        "qwen2_moe": (TopK(k=2, renormalize=False), 48, True),
        "qwen2_moe-norm": (TopK(k=2), 48, True),
        "deepseek_v3": (SigmoidTopK(k=2, n_group=4, topk_group=2, scaling=2.5), 64, False),
        "deepseek_v3-ungrouped": (SigmoidTopK(k=2, renormalize=False, scaling=1.5), 0, False),
    }
    for family, settings in expected.items():
        c = interop.from_hf(hf_block(family)).config
        assert (c.router, c.shared_hidden, c.shared_gate) == settings, family


def test_deepseek_bias_decides_the_choice():
    block = hf_block("deepseek_v3")
    moe = interop.from_hf(block)
    torch.testing.assert_close(moe.router_state.bias, block.gate.e_score_correction_bias)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        moe.router_state.bias.zero_()
        assert not torch.equal(moe.route(x).mask, dense(block, x)[0])


def test_round_trips_keep_weights_and_outputs(block):
    back = interop.to_hf(interop.from_hf(block), like=block)
    assert type(back) is type(block)
    for name, t in block.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(back(x.clone()), block(x.clone()))


def test_dtypes_follow_the_block():
    block = hf_block("deepseek_v3").to(torch.bfloat16)
    block.gate.float()  # as DeepSeek-V3 checkpoints load: router weight and bias in float32
    moe = interop.from_hf(block)
    assert moe.experts.gate_up.dtype == moe.shared.down.dtype == torch.bfloat16
    assert moe.gate.weight.dtype == moe.router_state.bias.dtype == torch.float32
    back = interop.to_hf(moe, like=block)
    for name, t in block.state_dict().items():
        assert back.state_dict()[name].dtype == t.dtype, name
        assert torch.equal(back.state_dict()[name], t), name


@pytest.mark.parametrize("family", list(EXPRESSIBLE))
def test_minimoe_round_trips_through_each_family(family):
    moe = minimoe_moe(family)
    block = interop.to_hf(moe, like=hf_block(family))  # a block of other sizes: the family only
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(5))
    for like in (block, block.experts.config):  # a config: used as it is, so it must agree
        again = interop.from_hf(interop.to_hf(moe, like=like))
        assert again.config == moe.config
        for name, t in moe.state_dict().items():
            assert torch.equal(again.state_dict()[name], t), name
        with torch.no_grad():
            assert torch.equal(again(x).output, moe(x).output)


def test_gradients_agree(block):
    moe = interop.from_hf(block)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    moe(x).output.sum().backward()
    block(x.clone()).sum().backward()
    grads = copy.deepcopy(moe)  # our gradients, written into an HF block by the same mapping
    with torch.no_grad():
        for g, p in zip(grads.parameters(), moe.parameters(), strict=True):
            g.copy_(p.grad)
    ours = dict(interop.to_hf(grads, like=block).named_parameters())
    for name, p in block.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_unsupported_blocks_raise_type_error():
    pytest.importorskip("transformers", minversion="5", reason=SKIP)
    from transformers.models.olmoe.modeling_olmoe import OlmoeMLP

    families = "Mixtral.*OLMoE.*Qwen2-MoE.*DeepSeek-V3"
    moe = minimoe_moe("mixtral")
    for other in (nn.Linear(32, 32), OlmoeMLP(hf_config("olmoe")), hf_config("olmoe")):
        with pytest.raises(TypeError, match=families):
            interop.from_hf(other)  # a dense MLP, or a config, is no sparse MoE block
    for other in (nn.Linear(32, 32), OlmoeMLP(hf_config("olmoe"))):
        with pytest.raises(TypeError, match=families):
            interop.to_hf(moe, like=other)
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock"):
        interop.from_mixtral(hf_block("olmoe"))
    with pytest.raises(TypeError, match="MixtralConfig"):
        interop.to_mixtral(moe, hf_config("olmoe"))
    with pytest.raises(TypeError, match="minimoe MoE"):
        interop.to_hf(hf_block("olmoe"), like=hf_block("olmoe"))


INEXPRESSIBLE = [
    *[(f, {"activation": "gelu"}, "activation") for f in EXPRESSIBLE],
    *[(f, {"capacity_factor": 1.25}, "capacity_factor") for f in EXPRESSIBLE],
    *[(f, {"router": TopP()}, "router") for f in EXPRESSIBLE],
    *[(f, {"router": GWBroadcast(TopK(), threshold=0.5)}, "router") for f in EXPRESSIBLE],
    ("mixtral", {"router": TopK(renormalize=False)}, "router=.*renormalize=False"),
    ("mixtral", {"shared_hidden": 16}, "shared_hidden"),
    ("olmoe", {"shared_hidden": 16}, "shared_hidden"),
    ("qwen2_moe", {"shared_gate": False}, "shared_gate"),
    ("qwen2_moe", {"shared_hidden": 0, "shared_gate": False}, "shared_gate"),
    ("deepseek_v3", {"router": TopK()}, "router"),
    ("deepseek_v3", {"router": SigmoidTopK(score="softmax")}, "router=.*score='softmax'"),
    ("deepseek_v3", {"router": SigmoidTopK(k=2, n_group=4, topk_group=2)}, "n_group"),
    ("deepseek_v3", {"shared_gate": True}, "shared_gate"),
    ("deepseek_v3", {"shared_hidden": 36}, "shared_hidden"),  # 1.5 experts of width 24
]


@pytest.mark.parametrize(("family", "change", "match"), INEXPRESSIBLE)
def test_inexpressible_moe_raises(family, change, match):
    moe = MoE(MoEConfig(d_model=16, d_hidden=24, num_experts=4, **EXPRESSIBLE[family] | change))
    with pytest.raises(ValueError, match=match):
        interop.to_hf(moe, like=hf_config(family))
    if family == "mixtral":  # the old name refuses the same
        with pytest.raises(ValueError, match=match):
            interop.to_mixtral(moe)


def test_inexpressible_block_or_config_raises():
    block = hf_block("mixtral")
    block.jitter_noise = 0.01  # what the block's forward reads, whatever its config says
    assert interop.from_hf(block).config.router.input_jitter == 0.01
    block.jitter_noise = 0.0
    moe = MoE(MoEConfig(d_model=32, d_hidden=64, num_experts=8, router=TopK(k=1, renormalize=True)))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        interop.to_hf(moe, like=block.experts.config)  # a top-2 config for a top-1 MoE
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        interop.to_mixtral(moe, block.experts.config)
    olmoe = hf_block("olmoe")
    olmoe.experts.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        interop.from_hf(olmoe)


def test_mixtral_names_still_work():
    block = hf_block("mixtral")
    moe = interop.from_mixtral(block)
    assert moe.config.router == TopK(k=2)
    back = interop.to_mixtral(moe)
    for name, t in block.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_imports_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    module = importlib.reload(interop)
    moe = MoE(MoEConfig(d_model=8, d_hidden=16, num_experts=4))
    with pytest.raises(ImportError, match=r"bench"):
        module.to_mixtral(moe)
    with pytest.raises(ImportError, match=r"bench"):
        module.from_hf(nn.Linear(8, 8))


def test_a_deepseek_block_hf_cannot_run_is_refused_with_the_reason():
    block = hf_block(
        "deepseek_v3", n_group=8
    )  # 8 experts: one per group, HF scores a group by its best two
    with pytest.raises(RuntimeError):
        block(torch.randn(2, 3, 32))  # Hugging Face's own forward fails
    with pytest.raises(ValueError, match="n_group=8 over 8 experts, fewer than 2 per group"):
        interop.from_hf(block)


def test_a_qwen2_block_without_a_shared_expert_converts_to_none():
    config = hf_config("qwen2_moe")
    config.shared_expert_intermediate_size = 0  # Qwen2-MoE models without a shared expert
    modeling = importlib.import_module("transformers.models.qwen2_moe.modeling_qwen2_moe")
    block = modeling.Qwen2MoeSparseMoeBlock(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*block.parameters(), *block.buffers()]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    moe = interop.from_hf(block)
    assert (moe.config.shared_hidden, moe.config.shared_gate, moe.shared) == (0, False, None)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))  # (B, L, d)
    with torch.no_grad():
        theirs = block.eval()(x.clone())
        torch.testing.assert_close(moe.eval()(x).output, theirs, atol=1e-5, rtol=0)
    assert theirs.abs().max() > 0.1

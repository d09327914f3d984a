"""Conformance with every Hugging Face family the table converts: from a small config with random
weights, the same experts, weights, outputs and gradients in float32, and an exact round trip;
the refused families say why. Skipped without transformers (the bench extra)."""

import dataclasses

import pytest
import torch

from minimoe import MoE, MoEConfig, interop
from minimoe.families import FAMILIES, DeepSeekV2Map
from minimoe.routing import TopK

pytest.importorskip("transformers", minversion="5", reason="the bench extra: pip install -e '.[bench]'")  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

CONVERTS = [f for f in FAMILIES if f.converts]
REFUSED = [f for f in FAMILIES if not f.converts]

# the spec settings a test router takes, per variant: every rule step on, then off
VARIANTS = {
    "on": {"k": 2, "renormalize": True, "scaling": 2.5, "n_group": 4, "topk_group": 2,
           "selection_bias": True, "softcap": 3.0, "norm_min": 1e-12},
    "off": {"k": 3, "renormalize": False, "scaling": 1.0, "n_group": 1, "topk_group": 1,
            "selection_bias": False, "softcap": 0.0, "norm_min": 1e-12},
}  # fmt: skip
D, H, E = 32, 16, 8
# config fields some families check against hidden_size = D
EXTRA = {
    "Granite-MoE-Hybrid": {"mamba_n_heads": 8},
    "Unlimited-OCR": {"num_attention_heads": 4, "num_key_value_heads": 4},
}


def example(family, variant: str) -> MoE:
    """A minimoe MoE that ``family`` can express, with the router settings of ``variant``."""
    rule = family.rule
    settings = {spec: VARIANTS[variant][spec] for spec in rule.fields.values()}
    router = rule.spec(**rule.constants, **settings)
    if family.shared is None:
        shared = 0
    elif family.shared_width == family.width:
        shared = H  # one config field for both widths
    else:
        shared = 2 * H if family.shared_width is None else 24
    return MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=E, router=router,
                         shared_hidden=shared, shared_gate=family.shared_gate is not None))  # fmt: skip


def randomize(block, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*block.parameters(), *block.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def hf_routing(block, x: torch.Tensor):
    """The block's own decision as (T, E) mask and weights, read where its experts receive it.

    Beam and Laguna scale the experts' summed output instead of the weights: that scale is
    folded in, as minimoe's spec does."""
    seen = {}

    def grab(module, args):
        seen["idx"], seen["w"] = args[1], args[2]

    handle = block.experts.register_forward_pre_hook(grab)
    with torch.no_grad():
        block(x)
    handle.remove()
    idx, w = seen["idx"], seen["w"].float() * getattr(block, "routed_scaling_factor", 1.0)
    mask = torch.zeros(idx.shape[0], E, dtype=torch.bool).scatter_(1, idx, True)
    return mask, torch.zeros(idx.shape[0], E).scatter_(1, idx, w)


CASES = [pytest.param(f, v, id=f"{f.name}-{v}") for f in CONVERTS for v in VARIANTS]


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_family_conforms(family, variant):
    moe = example(family, variant)
    config = interop.hf_config(moe, family.name, **EXTRA.get(family.name, {}))
    block = interop.to_hf(moe, like=config)
    randomize(block)
    ours = interop.from_hf(block)
    assert ours.config.router == moe.config.router  # the config maps back to the same spec
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(1))
    mask, weights = hf_routing(block, x.clone())
    out = ours(x)
    assert torch.equal(out.routing.mask, mask)
    torch.testing.assert_close(out.routing.weights, weights, atol=1e-5, rtol=1e-5)
    theirs = block(x.clone())
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    torch.testing.assert_close(out.output, theirs, atol=1e-5, rtol=1e-4)
    assert out.output.abs().max() > 0.1  # not a trivially zero comparison
    # gradients, router included: ours written into a block by the same mapping
    out.output.pow(2).sum().backward()
    theirs.pow(2).sum().backward()
    grads = dataclasses.replace(moe.config)  # same config: a fresh MoE holds our gradients
    holder = MoE(grads)
    with torch.no_grad():
        for g, p in zip(holder.parameters(), ours.parameters(), strict=True):
            g.copy_(p.grad)
        for b, o in zip(holder.buffers(), ours.buffers(), strict=True):
            b.copy_(o)
    mapped = dict(interop.to_hf(holder, like=block).named_parameters())
    for name, p in block.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(mapped[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)
    # the round trip is exact
    back = interop.to_hf(ours, like=block)
    for name, t in block.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_every_rule_step_is_exercised():
    """The 'on' variant turns on every setting some family reads from its config."""
    read = {spec for f in CONVERTS for spec in f.rule.fields.values()}
    assert read <= set(VARIANTS["on"]), read - set(VARIANTS["on"])
    assert any(isinstance(f.rule, DeepSeekV2Map) for f in CONVERTS)  # groups scored by max


@pytest.mark.parametrize("family", REFUSED, ids=[f.name for f in REFUSED])
def test_refused_families_say_why(family):
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=E, router=TopK()))
    reason = family.refuse or "no minimoe spec"
    assert reason
    with pytest.raises(ValueError, match=f"{family.name} does not convert"):
        interop.to_hf(moe, like=family.name)


def test_refusal_of_a_block_names_the_reason():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = GptOssConfig(hidden_size=16, intermediate_size=8, num_local_experts=4,
                          num_experts_per_tok=2)  # fmt: skip
    with pytest.raises(ValueError, match="gpt-oss does not convert: experts: interleaved"):
        interop.from_hf(GptOssMLP(config))


def test_a_required_setting_is_refused_naming_it():
    moe = example(next(f for f in CONVERTS if f.name == "Cohere2-MoE"), "on")
    block = interop.to_hf(moe, like="Cohere2-MoE")
    block.experts.config.expert_selection_fn = "sigmoid"
    with pytest.raises(ValueError, match="expert_selection_fn='softmax', got 'sigmoid'"):
        interop.from_hf(block)

"""Conformance with every Hugging Face family the table converts: from a small config with random
weights, the same experts, weights, outputs and gradients in float32, and an exact round trip;
the refused families say why. Skipped without transformers (the bench extra)."""

import pytest
import torch

from minimoe import MoE, MoEConfig, interop
from minimoe.families import FAMILIES, DeepSeekV2Map
from minimoe.routing import HashTopK, TopK

pytest.importorskip("transformers", minversion="5", reason="the bench extra: pip install -e '.[bench]'")  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

CONVERTS = [f for f in FAMILIES if f.converts]
# blocks whose output follows their router (NLLB-MoE's does not: tests/test_family_specifics.py)
FOLLOWS = [f for f in CONVERTS if f.follows_router]
REFUSED = [f for f in FAMILIES if not f.converts]

# the spec settings a test router takes, per variant: every rule step on, then off
VARIANTS = {
    "on": {"k": 2, "renormalize": True, "scaling": 2.5, "n_group": 4, "topk_group": 2,
           "selection_bias": True, "softcap": 3.0, "norm_min": 0.6, "identity_experts": 2,
           "jitter_eps": 0.2, "norm_p": 2.0, "expert_capacity": 3, "input_jitter": 0.01},
    "off": {"k": 3, "renormalize": False, "scaling": 1.0, "n_group": 1, "topk_group": 1,
            "selection_bias": False, "softcap": 0.0, "norm_min": 1e-12, "identity_experts": 0,
            "jitter_eps": 0.0, "norm_p": 1.0, "expert_capacity": 64, "input_jitter": 0.0},
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
    activation = family.activations[0 if variant == "on" else -1][1]  # Switch: relu, gelu
    return MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=E, router=router, activation=activation,
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
    if seen["idx"].dim() == 3:  # Switch: (T, 1, E) one-hot after the drops, (T, 1) weights
        mask = seen["idx"][:, 0].bool()
        return mask, seen["w"] * mask
    idx, w = seen["idx"], seen["w"].float() * getattr(block, "routed_scaling_factor", 1.0)
    # LongCat-Flash sends identity-expert picks to a true expert with weight 0: count weights
    chosen = torch.zeros(idx.shape[0], E).scatter_add_(1, idx, (w != 0).float())
    return chosen > 0, torch.zeros(idx.shape[0], E).scatter_add_(1, idx, w)


def assert_same_gradients(ours, block) -> None:
    """Our parameters' gradients, written into a block by the weights' mapping, equal the
    block's own (router included)."""
    holder = MoE(ours.config)  # holds our gradients as weights, to map them like weights
    with torch.no_grad():
        for g, p in zip(holder.parameters(), ours.parameters(), strict=True):
            g.copy_(p.grad)
        for b, o in zip(holder.buffers(), ours.buffers(), strict=True):
            b.copy_(o)
    mapped = dict(interop.to_hf(holder, like=block).named_parameters())
    for name, p in block.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(mapped[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)


CASES = [pytest.param(f, v, id=f"{f.name}-{v}") for f in FOLLOWS for v in VARIANTS]


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_family_conforms(family, variant):
    moe = example(family, variant)
    config = interop.hf_config(moe, family.name, **EXTRA.get(family.name, {}))
    block = interop.to_hf(moe, like=config)
    randomize(block)
    ours = interop.from_hf(block)
    block.eval(), ours.eval()  # PhiMoE samples its experts in training
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
    if variant == "on" and family.name == "Switch":  # its capacity of 3 per sequence drops
        assert out.stats.unrouted_tokens > 0
    # gradients, router included
    out.output.pow(2).sum().backward()
    theirs.pow(2).sum().backward()
    assert_same_gradients(ours, block)
    # the round trip is exact
    back = interop.to_hf(ours, like=block)
    for name, t in block.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_every_rule_step_is_exercised():
    """The 'on' variant turns on every setting some family reads from its config."""
    read = {spec for f in FOLLOWS for spec in f.rule.fields.values()}
    assert read <= set(VARIANTS["on"]), read - set(VARIANTS["on"])
    assert any(isinstance(f.rule, DeepSeekV2Map) for f in FOLLOWS)  # groups scored by max


@pytest.mark.parametrize("family", REFUSED, ids=[f.name for f in REFUSED])
def test_refused_families_say_why(family):
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=E, router=TopK()))
    assert family.refuse  # every family that does not convert says why
    with pytest.raises(ValueError, match=f"{family.name} does not convert: .{{12}}"):
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


# ---- routers whose blocks do not convert: the rule alone, against the HF router --------------


def family(name):
    return next(f for f in FAMILIES if f.name == name)


def dense(idx, weights, num_experts):
    """(T, k) indices and weights as (T, E) mask and weights."""
    mask = torch.zeros(idx.shape[0], num_experts, dtype=torch.bool).scatter_(1, idx, True)
    return mask, torch.zeros(idx.shape[0], num_experts).scatter(1, idx, weights.float())


def assert_same_rule(router, ours, mask, weights, hf_weights):
    """Same choice and weights, and the same gradient on the HF router's parameters."""
    assert torch.equal(ours.mask, mask)
    torch.testing.assert_close(ours.weights, weights, atol=1e-6, rtol=1e-5)
    mix = torch.randn(weights.shape, generator=torch.Generator().manual_seed(7))
    params = [p for p in router.parameters() if p.requires_grad]
    theirs = torch.autograd.grad((hf_weights * mix).sum(), params, retain_graph=True)
    mine = torch.autograd.grad((ours.weights * mix).sum(), params)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gpt_oss_router():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    config = GptOssConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2)
    router = GptOssTopKRouter(config)
    randomize(router)
    logits, weights, idx = router(torch.randn(24, 16))  # logits include the Linear's bias
    mask, w = dense(idx, weights, 8)
    ours = family("gpt-oss").rule.router(config, "gpt-oss")(logits, training=True)
    assert_same_rule(router, ours, mask, w, w)


def test_llama4_router():
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    config = Llama4TextConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=1)
    router = Llama4Router(config)
    randomize(router)
    scores, logits = router(torch.randn(24, 16))  # (T, E): sigmoid of the chosen logit, else 0
    ours = family("Llama-4").rule.router(config, "Llama-4")(logits, training=True)
    assert_same_rule(router, ours, scores > 0, scores, scores)


def test_deepseek_v4_routers_top_k_and_hash():
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

    config = DeepseekV4Config(hidden_size=16, num_local_experts=8, num_experts_per_tok=2,
                              vocab_size=32, routed_scaling_factor=1.5)  # fmt: skip
    router = v4.DeepseekV4TopKRouter(config)
    randomize(router)
    x = torch.randn(24, 16)
    logits, weights, idx = router(x)
    spec = family("DeepSeek-V4").rule.router(config, "DeepSeek-V4")
    ours = spec(logits, training=True, state={"bias": router.e_score_correction_bias})
    mask, w = dense(idx, weights, 8)
    assert_same_rule(router, ours, mask, w, w)

    hashed = v4.DeepseekV4HashRouter(config)
    randomize(hashed)
    table = HashTopK(k=2, vocab_size=32, scaling=1.5).init_state(8)["table"]
    hashed.tid2eid.copy_(table)
    ids = torch.randint(0, 32, (24,), generator=torch.Generator().manual_seed(3))
    logits, weights, idx = hashed(x, ids)
    rule = HashTopK(k=2, vocab_size=32, scaling=1.5)
    ours = rule(logits, training=True, state={"table": table}, token_ids=ids)
    mask, w = dense(idx, weights, 8)
    assert_same_rule(hashed, ours, mask, w, w)


def test_dbrx_p_norm_rule():
    from transformers import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    config = DbrxConfig(d_model=16, ffn_config={"ffn_hidden_size": 8, "moe_num_experts": 8,
                                                "moe_top_k": 3, "moe_normalize_expert_weights": 2.0})  # fmt: skip
    block = DbrxFFN(config)
    randomize(block)
    logits = block.router(torch.randn(1, 24, 16))
    weights, idx = block.route_tokens_to_experts(logits)
    ours = family("DBRX").rule.router(config.ffn_config, "DBRX")(logits, training=True)
    mask, w = dense(idx, weights, 8)
    assert_same_rule(block.router, ours, mask, w, w)


def test_switch_router_with_capacity_per_sequence():
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers import modeling_switch_transformers as st

    config = SwitchTransformersConfig(d_model=16, num_experts=4, expert_capacity=2,
                                      router_jitter_noise=0.0, dropout_rate=0.0)  # fmt: skip
    router = st.SwitchTransformersTop1Router(config)
    randomize(router)
    kept, top, logits = router(torch.randn(3, 8, 16))  # (B, L, E) one-hot kept, (B, L, 1)
    mask = kept.reshape(24, 4).bool()
    assert (~mask.any(1)).sum() > 0  # some tokens dropped: the capacity is exercised
    spec = family("Switch").rule.router(config, "Switch")
    ours = spec(logits.reshape(24, 4), training=True, seq_len=8)
    w = top.reshape(24, 1) * mask
    assert_same_rule(router, ours, mask, w, w)


def nllb(capacity: int, fraction: float):
    from transformers import NllbMoeConfig

    return NllbMoeConfig(d_model=16, num_experts=4, expert_capacity=capacity,
                         moe_eval_capacity_token_fraction=fraction, moe_token_dropout=0.0)  # fmt: skip


@pytest.mark.parametrize(("training", "fraction"), [(True, 1.0), (False, 0.25)])
def test_nllb_router_with_capacity(training, fraction):
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router

    config = nllb(3, fraction)
    router = NllbMoeTop2Router(config).train(training)
    randomize(router)
    _, weights, logits = router(torch.randn(24, 16))  # weights: (T, E) gates after the drop
    mask = weights > 0
    assert mask.sum() < 48  # some pairs dropped
    spec = family("NLLB-MoE").rule.router(config, "NLLB-MoE")
    assert_same_rule(router, spec(logits, training=training), mask, weights, weights)


def test_every_family_names_classes_of_the_pinned_transformers():
    for f in FAMILIES:
        config_cls, block_cls = interop._classes(f)
        assert config_cls.__name__ == f.config and block_cls.__name__ == f.block, f.name


@pytest.mark.parametrize("name", ["AFMoE", "ERNIE-4.5-MoE", "HY-V3", "LongCat-Flash", "Laguna"])
def test_a_bfloat16_block_keeps_its_float32_router_and_bias(name):
    f = family(name)
    block = interop.to_hf(example(f, "on"), like=name)
    randomize(block)
    block.to(torch.bfloat16)
    router = interop._get(block, f.router.rsplit(".", 1)[0])
    router.float()  # as checkpoints load: router (and a bias kept beside it) in float32
    *parents, leaf = f.bias.split(".")
    holder = interop._get(block, ".".join(parents))
    old = getattr(holder, leaf)
    bias = old.detach().float()
    setattr(
        holder,
        leaf,
        torch.nn.Parameter(bias, False) if isinstance(old, torch.nn.Parameter) else bias,
    )
    moe = interop.from_hf(block)
    assert moe.experts.gate_up.dtype == torch.bfloat16
    assert moe.gate.weight.dtype == moe.router_state.bias.dtype == torch.float32
    back = interop.to_hf(moe, like=block)
    for key, t in block.state_dict().items():
        assert back.state_dict()[key].dtype == t.dtype, key
        assert torch.equal(back.state_dict()[key], t), key

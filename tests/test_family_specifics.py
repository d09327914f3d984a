"""What the shared conformance test (tests/test_families.py) does not cover, family by family:
settings with no counterpart that are refused naming the field, the training-time parts of a
router, the losses Hugging Face computes outside the block, and the defects of its blocks (each
shown here, and said in the family table). Small configs, random weights, float32."""

import dataclasses

import pytest
import torch

from minimoe import MoE, MoEConfig, interop
from minimoe.losses import load_balance_loss, z_loss
from minimoe.routing import CapacityTopK, ScoreTopK

pytest.importorskip("transformers", minversion="5", reason="the bench extra: pip install -e '.[bench]'")  # fmt: skip

from test_families import D, assert_same_gradients, example, family, hf_routing, randomize  # noqa: E402


def x_of(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- DBRX ------------------------------------------------------------------------------------


def dbrx(**ffn):
    from transformers import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    settings = {"ffn_hidden_size": 8, "moe_num_experts": 4, "moe_top_k": 2} | ffn
    block = DbrxFFN(DbrxConfig(d_model=16, ffn_config=settings))
    randomize(block)
    return block


def test_dbrx_without_normalization_keeps_the_softmax_values():
    block = dbrx(moe_normalize_expert_weights=None).eval()
    moe = interop.from_hf(block).eval()
    assert moe.config.router == ScoreTopK(k=2, renormalize=False)
    x = x_of(2, 6, 16)
    out = moe(x)
    torch.testing.assert_close(out.output, block(x.clone()), atol=1e-5, rtol=1e-4)
    assert out.routing.weights.sum(1).max() < 1  # undivided: a part of the softmax
    back = interop.to_hf(moe, like="DBRX")
    assert back.moe_normalize_expert_weights is None
    for name, t in block.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_dbrx_refusals_name_the_field():
    with pytest.raises(ValueError, match=r"ffn_act_fn.name='gelu'"):
        interop.from_hf(dbrx(ffn_act_fn={"name": "gelu"}))
    moe = MoE(MoEConfig(d_model=16, d_hidden=8, num_experts=4, router=ScoreTopK(k=2, scaling=2.0)))
    with pytest.raises(ValueError, match="DBRX cannot express .*scaling=1.0"):
        interop.to_hf(moe, like="DBRX")


def test_dbrx_jitter_scales_the_blocks_input_in_place():
    """DEFECT: DbrxRouter multiplies its input in place (``hidden_states *= U(1-eps, 1+eps)``),
    and that tensor is the block's input: in training the experts see the jittered tokens, and
    the caller's tensor is changed (megablocks' router multiplies a copy). The conversion
    follows the block (``jitter_experts=True``)."""
    block = dbrx(moe_jitter_eps=0.1).train()
    assert interop.from_hf(block).config.router.jitter_experts
    seen = {}
    block.experts.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].clone()))
    x = x_of(1, 6, 16)
    before = x.clone()
    block(x)
    fixed = "transformers fixed DbrxRouter's in-place jitter: set jitter_experts=False for DBRX"
    assert not torch.equal(x, before), fixed  # the caller's tensor
    ratio = x / before
    assert ((ratio - 1).abs() <= 0.1 + 1e-6).all()  # scaled by U(0.9, 1.1)
    torch.testing.assert_close(seen["x"], x)  # the experts ran on the jittered x


# ---- Switch Transformers ----------------------------------------------------------------------


def switch_config(**changes):
    from transformers import SwitchTransformersConfig

    settings = {"d_model": 16, "d_ff": 8, "num_experts": 4, "expert_capacity": 3,
                "router_jitter_noise": 0.0, "dropout_rate": 0.0} | changes  # fmt: skip
    return SwitchTransformersConfig(**settings)


def switch(**changes):
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    block = SwitchTransformersSparseMLP(switch_config(**changes))
    randomize(block)
    return block


def test_switch_losses_are_hfs_per_layer_and_per_sequence():
    """minimoe's z-loss is Hugging Face's ``router_z_loss_func`` on one layer; its balance loss
    is Hugging Face's on one sequence. Hugging Face's is the mean over sequences of each
    sequence's loss (its f and P are per sequence), so over a batch the two differ."""
    from transformers.models.switch_transformers import modeling_switch_transformers as st

    block = switch().eval()
    moe = interop.from_hf(block).eval()
    x = x_of(3, 8, 16)
    out = moe(x)
    logits = out.routing.logits.view(3, 8, 4)  # (B, L, E)
    torch.testing.assert_close(out.losses["z_loss"], st.router_z_loss_func(logits))
    probs = logits.softmax(-1)
    hf_balance = st.load_balancing_loss_func(probs, logits.argmax(-1))
    per_sequence = [
        load_balance_loss(p, count="first") for p in probs
    ]  # minimoe's, sequence by sequence: first choices before the drops, as Hugging Face's
    torch.testing.assert_close(hf_balance, torch.stack(per_sequence).mean())
    assert abs(out.losses["load_balance"] - hf_balance) > 1e-3  # the batch's: another number
    one = moe(x[:1])
    torch.testing.assert_close(one.losses["load_balance"], per_sequence[0])
    torch.testing.assert_close(one.losses["z_loss"], z_loss(logits[0]))


def test_switch_router_losses_vanish_when_every_layer_is_sparse():
    """DEFECT: SwitchTransformersForConditionalGeneration adds its router losses only when
    ``encoder_sparse_step > 1``; a model whose every layer is sparse (step 1) trains neither."""
    from transformers import SwitchTransformersForConditionalGeneration

    losses = {}
    for sparse in (1, 2):  # of 2 layers
        config = switch_config(vocab_size=32, d_kv=8, num_heads=2, num_layers=2,
                               num_decoder_layers=2, num_sparse_encoder_layers=sparse,
                               num_sparse_decoder_layers=sparse, expert_capacity=8,
                               decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
        torch.manual_seed(0)
        model = SwitchTransformersForConditionalGeneration(config)
        ids = torch.randint(1, 32, (2, 6), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
        layers = sum(b.layer[-1].is_sparse for b in model.encoder.block)
        losses[layers] = (float(out.encoder_z_loss), float(out.encoder_aux_loss))
    assert losses[1][0] > 1 and losses[1][1] > 0.5  # one sparse layer of 2: both losses
    assert losses[2] == (0.0, 0.0)  # two sparse layers of 2: neither


def test_switch_jitter_reaches_the_experts_in_float32_only():
    """DEFECT: SwitchTransformersTop1Router casts its input to float32 and multiplies that in
    place: in a float32 block it is the block's input, so the experts see the jitter (and the
    caller's tensor changes); in bfloat16 the cast is a copy and only the router sees it. The
    conversion follows the block: ``jitter_experts`` is True in float32, False otherwise."""
    block = switch(router_jitter_noise=0.1).train()
    assert interop.from_hf(block).config.router.jitter_experts
    x = x_of(2, 8, 16)
    before = x.clone()
    block(x)
    fixed = "transformers fixed Switch's in-place jitter: set jitter_experts=False in float32"
    assert not torch.equal(x, before), fixed
    half = switch(router_jitter_noise=0.1).to(torch.bfloat16).train()
    assert not interop.from_hf(half).config.router.jitter_experts
    x = x.to(torch.bfloat16)
    before = x.clone()
    half(x)
    assert torch.equal(x, before)


def test_switch_in_bfloat16_trains_as_hf_with_the_router_alone_jittered():
    block = switch(router_jitter_noise=0.2, expert_capacity=8).to(torch.bfloat16).train()
    moe = interop.from_hf(block).train()
    x = x_of(2, 8, 16).to(torch.bfloat16)
    torch.manual_seed(3)
    mask, weights = hf_routing(block, x.clone())
    torch.manual_seed(3)
    theirs = block(x.clone())
    torch.manual_seed(3)
    out = moe(x)
    assert torch.equal(out.routing.mask, mask)
    torch.testing.assert_close(out.routing.weights, weights.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.output, theirs, atol=2e-2, rtol=2e-2)
    torch.manual_seed(3)
    assert not torch.equal(moe.eval()(x).routing.mask, mask)  # the jitter moved a choice


def test_switch_refusals_name_the_field():
    with pytest.raises(ValueError, match="dropout_rate=0.0, got 0.1"):
        interop.from_hf(switch(dropout_rate=0.1))
    with pytest.raises(ValueError, match="router_bias=False, got True"):
        interop.from_hf(switch(router_bias=True))
    with pytest.raises(ValueError, match="dense_act_fn='gelu_new'"):
        interop.from_hf(switch(dense_act_fn="gelu_new"))
    swiglu = MoE(MoEConfig(d_model=16, d_hidden=8, num_experts=4,
                           router=CapacityTopK(k=1, per_sequence=True, normalize="none")))  # fmt: skip
    with pytest.raises(ValueError, match="Switch cannot express activation='swiglu'"):
        interop.to_hf(swiglu, like="Switch")
    two = MoE(MoEConfig(d_model=16, d_hidden=8, num_experts=4, activation="relu",
                        router=CapacityTopK(k=2, per_sequence=True, normalize="none")))  # fmt: skip
    with pytest.raises(ValueError, match="Switch cannot express .*k=1"):
        interop.to_hf(two, like="Switch")


# ---- NLLB-MoE ---------------------------------------------------------------------------------


def nllb_block(**changes):
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    settings = {"d_model": 16, "num_experts": 4, "expert_capacity": 5, "moe_token_dropout": 0.0,
                "moe_eval_capacity_token_fraction": 0.3} | changes  # fmt: skip
    block = NllbMoeSparseMLP(NllbMoeConfig(**settings), ffn_dim=8)
    randomize(block)
    return block


def follows_its_router(block, x):
    """What a block that follows its router computes: its router's gates (T, E), after the
    capacity drops, and y = sum_e g_e expert_e(x), each expert its own module."""
    _, gates, _ = block.router(x)
    runs = torch.stack([block.experts[f"expert_{e}"](x) for e in range(gates.shape[1])], 1)
    return gates, (gates[:, :, None] * runs).sum(1)  # (T, E), (T, d)


NLLB_SETTINGS = {
    "defaults": {},
    "sampled, normalized before the drops, by priority": {
        "second_expert_policy": "sampling", "normalize_router_prob_before_dropping": True,
        "batch_prioritized_routing": True},
    "random second, by priority": {
        "second_expert_policy": "random", "batch_prioritized_routing": True},
    "gelu": {"activation_function": "gelu"},
}  # fmt: skip


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("changes", NLLB_SETTINGS.values(), ids=list(NLLB_SETTINGS))
def test_nllb_converts_following_its_router(changes, training):
    """NLLB-MoE converts to what its router decides (its block's output does not follow it: the
    next test): under one seed the same experts after the capacity drops (the second-expert
    policy's draws included), the same weights, the output of a block that follows its router,
    the same gradients (router, experts' weights and biases), and an exact round trip."""
    block = nllb_block(**changes).train(training)
    ours = interop.from_hf(block).train(training)
    x = x_of(24, 16) * 2
    x[12:18] = x[0]  # ties in the priority order
    torch.manual_seed(3)
    gates, want = follows_its_router(block, x)
    torch.manual_seed(3)
    out = ours(x)
    assert torch.equal(out.routing.mask, gates > 0)
    assert (gates > 0).sum() < 48  # the capacity dropped pairs
    torch.testing.assert_close(out.routing.weights, gates, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.output, want, atol=1e-5, rtol=1e-4)
    want.pow(2).sum().backward()
    out.output.pow(2).sum().backward()
    assert_same_gradients(ours, block)
    back = interop.to_hf(ours, like=block)
    for name, t in block.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_nllb_block_does_not_follow_its_router():
    """DEFECT: transformers 5.25's NllbMoeExperts one-hots the (T, E) 0/1 mask as if it held
    expert indices: expert 1 runs on every first choice, expert 0 on every other gated pair; the
    block's output is not its router's decision (minimoe's conversion follows the router)."""
    block = nllb_block(expert_capacity=24).eval()
    x = x_of(12, 16)
    with torch.no_grad():
        first, gates, _ = block.router(x)
        out = block(x[None])[0]
        _, intended = follows_its_router(block, x)
        runs = torch.stack([block.experts[f"expert_{e}"](x) for e in range(4)], 1)  # (T, E, d)
    index = first.long()[:, :, None].expand(-1, -1, 16)  # (T, E, d): the mask's 0 or 1
    defect = (gates[:, :, None] * runs.gather(1, index)).sum(1)  # expert 0 or 1 on each pair
    torch.testing.assert_close(out, defect)
    assert not torch.allclose(out, intended, atol=1e-3), (
        "transformers fixed NllbMoeExperts: its block now follows its router; set "
        "follows_router=True for NLLB-MoE in minimoe/families.py (tests/test_families.py then "
        "checks its block) and drop the DEFECT from its notes"
    )


def test_nllb_sampling_returns_noisy_logits():
    """DEFECT: with second_expert_policy='sampling' the router adds its Gumbel noise to the
    logits in place, and those are the logits it returns (the model's balance loss reads them);
    fairseq adds the noise to a copy. minimoe's Routing.logits are the router's own."""
    block = nllb_block(second_expert_policy="sampling")
    x = x_of(24, 16)
    with torch.no_grad():
        _, _, logits = block.router(x)
        clean = block.router.classifier(x)
    assert not torch.allclose(logits, clean), "transformers fixed NLLB-MoE's in-place Gumbel noise"
    assert torch.equal(interop.from_hf(block)(x).routing.logits, clean)


def test_nllb_random_second_normalized_before_the_drops_is_refused():
    """DEFECT, so refused: with second_expert_policy='random' and
    normalize_router_prob_before_dropping=True, Hugging Face's router normalizes the first weight
    by P_1 + P_2 but weighs the kept second expert by its raw P_2 (fairseq: P_2 / (P_1 + P_2))."""
    block = nllb_block(second_expert_policy="random", normalize_router_prob_before_dropping=True,
                       expert_capacity=24)  # fmt: skip
    x = x_of(24, 16)
    with torch.no_grad():
        first, gates, logits = block.router(x)
    probs = logits.softmax(-1)
    second = (gates > 0) & (first == 0)  # (T, E) the kept second choices
    rows = second.any(1)
    assert rows.any()
    p1, p2 = (probs * first).sum(1)[rows], (probs * second).sum(1)[rows]
    g2 = (gates * second).sum(1)[rows]
    fixed = "transformers fixed NLLB-MoE's 'random' weight: convert it (families.NllbMap)"
    torch.testing.assert_close(g2, p2, msg=fixed)  # raw
    assert not torch.allclose(g2, p2 / (p1 + p2))  # not normalized as the first is
    with pytest.raises(ValueError, match="second_expert_policy='random' only with "
                       "normalize_router_prob_before_dropping=False"):  # fmt: skip
        interop.from_hf(block)


def test_nllb_refusals_name_the_field():
    with pytest.raises(ValueError, match="moe_token_dropout=0.0, got 0.2"):
        interop.from_hf(nllb_block(moe_token_dropout=0.2))
    with pytest.raises(ValueError, match="activation_dropout=0.0, got 0.1"):
        interop.from_hf(nllb_block(activation_dropout=0.1))
    with pytest.raises(ValueError, match="router_bias=False, got True"):
        interop.from_hf(nllb_block(router_bias=True))
    moe = interop.from_hf(nllb_block())
    plain = MoE(dataclasses.replace(moe.config, expert_bias=False))
    with pytest.raises(ValueError, match="NLLB-MoE cannot express expert_bias=False"):
        interop.to_hf(plain, like="NLLB-MoE")
    for router, field in ((CapacityTopK(k=2, normalize="none"), "normalize"),
                          (CapacityTopK(k=2, second_expert="random", normalize="before_drop"),
                           "second_expert='random'")):  # fmt: skip
        moe.replace_config(router=router)
        with pytest.raises(ValueError, match=f"NLLB-MoE cannot express .*{field}"):
            interop.to_hf(moe, like="NLLB-MoE")


def test_nllb_router_keeps_the_evaluation_capacity_in_training():
    """DEFECT: NllbMoeTop2Router writes its capacity into ``self.expert_capacity``: after one
    evaluation forward (``moe_eval_capacity_token_fraction``), training keeps that capacity.
    minimoe's spec computes the capacity on each call from its settings."""
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router

    config = NllbMoeConfig(d_model=16, num_experts=4, expert_capacity=3,
                           moe_eval_capacity_token_fraction=0.5, moe_token_dropout=0.0)  # fmt: skip
    router = NllbMoeTop2Router(config)
    randomize(router)
    spec = family("NLLB-MoE").rule.router(config, "NLLB-MoE")
    x = x_of(24, 16)
    kept = {}
    for step, training in (("train", True), ("eval", False), ("train again", True)):
        _, weights, logits = router.train(training)(x)
        kept[step] = int((weights > 0).sum())
        ours = spec(logits.detach(), training=training)
        if step != "train again":  # the first two agree with the spec
            assert int(ours.mask.sum()) == kept[step]
        else:
            assert int(ours.mask.sum()) == kept["train"] == 12  # 3 slots x 4 experts
    assert kept["train again"] == kept["eval"] > 12  # the evaluation capacity leaked


# ---- Gemma 4: a normed router with per-expert scales ------------------------------------------


@pytest.mark.parametrize("name", ["Gemma-4", "Diffusion-Gemma"])
def test_gemma_router_conforms_with_its_trained_scales(name):
    """Hugging Face's router module (router and experts are separate modules of the decoder
    layer, so no block converts): same experts, weights and gradients of all three trained
    router tensors (the projection, the input scale and the per-expert scales)."""
    import importlib

    f = family(name)
    configuration = importlib.import_module(f"transformers.models.{f.module}.configuration_{f.module}")  # fmt: skip
    modeling = importlib.import_module(f"transformers.models.{f.module}.modeling_{f.module}")
    config = getattr(configuration, f.config)(hidden_size=16, num_experts=8, top_k_experts=3,
                                              moe_intermediate_size=8, enable_moe_block=True,
                                              rms_norm_eps=1e-5)  # fmt: skip
    router = getattr(modeling, f.block.replace("Experts", "Router"))(config)
    randomize(router)  # the scales too: not their initial ones
    spec = f.rule.router(config, name)
    assert spec == ScoreTopK(k=3, input_norm=True, input_norm_eps=1e-5, expert_scales=True)
    moe = MoE(MoEConfig(d_model=16, d_hidden=8, num_experts=8, router=spec))
    assert sorted(n for n, _ in moe.router_params.named_parameters()) == [
        "expert_scale",
        "input_scale",
    ]
    ours_of = {router.proj.weight: moe.gate.weight, router.scale: moe.router_params.input_scale,
               router.per_expert_scale: moe.router_params.expert_scale}  # fmt: skip
    with torch.no_grad():
        for theirs, ours in ours_of.items():
            ours.copy_(theirs)
    x = x_of(24, 16) * 3
    _, weights, idx = router(x)
    routing = moe.route(x)
    dense = torch.zeros(24, 8).scatter(1, idx, weights)
    assert torch.equal(routing.mask, dense != 0)
    torch.testing.assert_close(routing.weights, dense, atol=1e-6, rtol=1e-5)
    assert (routing.weights.sum(1) - 1).abs().max() > 0.1  # the expert scales are exercised
    mix = x_of(24, 8, seed=5)
    theirs = torch.autograd.grad((dense * mix).sum(), list(ours_of))
    mine = torch.autograd.grad((routing.weights * mix).sum(), list(ours_of.values()))
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---- PhiMoE: SparseMixer sampled in training --------------------------------------------------


def phimoe(**changes):
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

    settings = {"hidden_size": 16, "intermediate_size": 8, "num_local_experts": 6,
                "router_jitter_noise": 0.3, "experts_implementation": "eager"} | changes  # fmt: skip
    block = PhimoeSparseMoeBlock(PhimoeConfig(**settings))
    randomize(block)
    return block


def test_phimoe_trains_as_hf_under_the_same_seed():
    """Training mode: both sample; seeded alike they pick the same experts with the same weights
    (Heun's 1/3 included), give the same output and the same gradients."""
    block = phimoe().train()
    moe = interop.from_hf(block).train()
    x = x_of(3, 40, 16)
    torch.manual_seed(11)
    theirs = block(x.clone())
    torch.manual_seed(11)
    out = moe(x)
    torch.testing.assert_close(out.output, theirs, atol=1e-5, rtol=1e-4)
    greedy = interop.from_hf(block).eval()(x).routing
    assert not torch.equal(out.routing.mask, greedy.mask)  # the sampling is exercised
    thirds = (out.routing.weights[out.routing.mask] / greedy.probs[out.routing.mask]).lt(0.5)
    assert thirds.any()  # and Heun's 1/3 (weights far below a softmax value)
    theirs.pow(2).sum().backward()
    out.output.pow(2).sum().backward()
    torch.testing.assert_close(moe.gate.weight.grad, block.router.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        moe.experts.gate_up.grad, block.experts.gate_up_proj.grad, atol=1e-4, rtol=1e-4
    )


def test_sparse_mixer_is_hfs_function_bit_for_bit_at_the_benchmarks_size():
    """T = 2048 tokens over E = 64 experts (benchmarks/moe_layer.py's size), training: under one
    seed the same two experts per token and the same weights, to the bit, as Hugging Face's
    ``sparsemixer``; the global generator left in the same state."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from minimoe.routing import sparse_mixer

    logits = x_of(2048, 64) * 2
    torch.manual_seed(5)
    weights, experts = sparsemixer(logits, jitter_eps=0.01, training=True, top_k=2)
    after = torch.rand(3)
    torch.manual_seed(5)
    ours = sparse_mixer(logits, 2, 0.01, training=True)
    assert torch.equal(torch.rand(3), after)
    assert torch.equal(ours.mask, torch.zeros_like(ours.mask).scatter(1, experts, True))
    assert torch.equal(ours.weights.gather(1, experts), weights)
    assert (ours.mask != sparse_mixer(logits, 2, 0.01).mask).any()  # sampled, not the best


def test_phimoe_jitters_twice():
    """DEFECT: PhimoeSparseMoeBlock scales its input by U(1-eps, 1+eps) in place, and its router
    scales that same tensor again: in training router and experts see the tokens jittered twice.
    The conversion follows the block (``jitter_draws=2``)."""
    block = phimoe(input_jitter_noise=0.1)
    assert interop.from_hf(block).config.router.jitter_draws == 2
    seen = {}
    block.experts.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].clone()))
    x = x_of(2, 8, 16)
    block.train()(x.clone())
    ratio = (seen["x"].view(2, 8, 16) / x - 1).abs()
    fixed = "transformers fixed PhiMoE's double jitter: jitter_draws=1 for PhiMoE"
    assert ratio.max() > 0.1 + 1e-3, fixed  # beyond one U(0.9, 1.1) factor
    assert ratio.max() <= 0.21 + 1e-6  # two factors


# ---- input jitter: converted, and trained as Hugging Face trains it -------------------------


@pytest.mark.parametrize("name", ["Mixtral", "MiniMax", "MiniMax-M2", "DBRX", "Switch", "PhiMoE"])
def test_jitter_trains_as_hf_under_the_same_seed(name):
    """In training with input jitter (eps 0.3), under one seed: the same jitter drawn, so the
    same output and the same gradients (the input's, the router's, the experts') as the block."""
    f = family(name)
    moe = example(f, "on")
    moe.replace_config(router=dataclasses.replace(moe.config.router, input_jitter=0.3))
    block = interop.to_hf(moe, like=interop.hf_config(moe, name))
    randomize(block)
    ours = interop.from_hf(block)
    assert ours.config.router.input_jitter == 0.3
    x = x_of(2, 12, D)
    with torch.no_grad():
        calm = ours.eval()(x).output
    block.train(), ours.train()
    mine, hers = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(7)
    theirs = block(hers.clone())  # the block multiplies its input in place
    torch.manual_seed(7)
    out = ours(mine)
    torch.testing.assert_close(out.output, theirs, atol=1e-5, rtol=1e-4)
    assert (out.output - calm).abs().max() > 1e-3  # the jitter acts
    theirs.pow(2).sum().backward()
    out.output.pow(2).sum().backward()
    torch.testing.assert_close(mine.grad, hers.grad, atol=1e-4, rtol=1e-4)
    assert_same_gradients(ours, block)


def test_jitter_refusals_name_the_field():
    moe = example(family("Mixtral"), "on")
    router = dataclasses.replace(moe.config.router, input_jitter=0.1, jitter_experts=False)
    moe.replace_config(router=router)
    with pytest.raises(ValueError, match="Mixtral cannot express jitter_experts=False"):
        interop.to_hf(moe, like="Mixtral")
    moe = example(family("PhiMoE"), "on")
    moe.replace_config(router=dataclasses.replace(moe.config.router, jitter_draws=1))
    with pytest.raises(ValueError, match="PhiMoE cannot express .*jitter_draws=2"):
        interop.to_hf(moe, like="PhiMoE")
    moe.replace_config(router=dataclasses.replace(moe.config.router, input_jitter=0.0))
    interop.to_hf(moe, like="PhiMoE")  # without jitter, its draws mean nothing
    half = example(family("Switch"), "on").to(torch.bfloat16)
    with pytest.raises(ValueError, match="Switch cannot express jitter_experts=True"):
        interop.to_hf(half, like="Switch")

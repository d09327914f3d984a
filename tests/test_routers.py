"""Router specs: validation, the registry, routers written outside the library, router state."""

import dataclasses
import math
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe import routing
from minimoe.dispatch import apply_capacity
from minimoe.layer import MoE, MoEConfig, kept_pairs, moe_layers
from minimoe.losses import load_balance_loss
from minimoe.model import ModelConfig, MoERegressor, TinyTransformer, set_router
from minimoe.routing import Adaptive, GWBroadcast, NoisyTopK, Routing, TopK, TopP
from minimoe.train import TrainConfig, train

SPECS = [
    TopK(),
    TopK(k=1, renormalize=False),
    NoisyTopK(),
    TopP(p=0.3, rule="code"),
    Adaptive(gap="normalized"),
    GWBroadcast(TopP(), threshold=0.5, max_slots=3),
    GWBroadcast(TopK(k=1, renormalize=True), threshold=1.6, measure="entropy"),
]


def logits(T=32, E=8, seed=0, scale=2.0):
    return scale * torch.randn(T, E, generator=torch.Generator().manual_seed(seed))


# ---- each spec checks its own fields ----------------------------------------------------


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda: TopK(k=2.5), "k=2.5"),
        (lambda: TopK(k=0), "k=0"),
        (lambda: TopK(k=True), "k=True"),
        (lambda: TopK(renormalize="no"), "renormalize='no'"),
        (lambda: NoisyTopK(k=-1), "k=-1"),
        (lambda: TopP(p=1.5), "p=1.5"),
        (lambda: TopP(p=0), "p=0"),
        (lambda: TopP(p=float("nan")), "p=nan"),
        (lambda: TopP(p="0.4"), "p='0.4'"),
        (lambda: TopP(rule="strict"), "rule='strict'"),
        (lambda: TopP(max_experts=0), "max_experts=0"),
        (lambda: TopP(dynamic_coef=float("nan")), "dynamic_coef=nan"),
        (lambda: TopP(balance_count="all"), "balance_count='all'"),
        (lambda: Adaptive(threshold=-1), "threshold=-1"),
        (lambda: Adaptive(threshold=1.5), "threshold=1.5"),
        (lambda: Adaptive(gap="log"), "gap='log'"),
        (lambda: GWBroadcast(TopK(), threshold=7.0), "threshold=7.0"),
        (lambda: GWBroadcast(TopK(), max_slots=-1), "max_slots=-1"),
        (lambda: GWBroadcast(TopK(), measure="variance"), "measure='variance'"),
        (lambda: GWBroadcast(TopK, threshold=0.5), "base="),
        (lambda: GWBroadcast(GWBroadcast(), threshold=0.5), "GWBroadcast"),
    ],
)
def test_bad_spec_fields_raise_naming_field_and_value(make, text):
    with pytest.raises((ValueError, TypeError), match=re.escape(text)):
        make()


@pytest.mark.parametrize(
    "router, text",
    [
        (TopK(k=9), "k=9"),
        (NoisyTopK(k=9), "k=9"),
        (GWBroadcast(TopK(), threshold=2.5, measure="entropy"), "threshold=2.5"),  # ln 8 = 2.08
        (GWBroadcast(TopK(k=9), threshold=0.5), "k=9"),
    ],
)
def test_settings_that_do_not_fit_num_experts_are_refused_by_the_config(router, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        MoEConfig(num_experts=8, router=router)


@pytest.mark.parametrize("bad", ["top_k", TopK, 3, None])
def test_config_refuses_what_is_not_a_router(bad):
    with pytest.raises(TypeError, match="router must be a router object"):
        MoEConfig(router=bad)


@pytest.mark.parametrize(
    "field, value",
    [
        ("d_model", 0),
        ("num_experts", 2.0),
        ("balance_coef", float("nan")),
        ("z_coef", -1e-3),
        ("dynamic_coef", -1.0),
        ("balance_count", "auto"),
        ("capacity_factor", float("inf")),
        ("capacity_factor", float("nan")),
        ("dispatch", "scatter"),
    ],
)
def test_bad_config_fields_raise_naming_field_and_value(field, value):
    with pytest.raises((ValueError, TypeError), match=re.escape(f"{field}=")):
        MoEConfig(**{field: value})


def test_config_is_frozen_and_replace_checks_again():
    config = MoEConfig(router=TopP())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.router = TopK()
    with pytest.raises(ValueError, match="k=9"):
        dataclasses.replace(config, router=TopK(k=9))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().n_layers = 3


# ---- specs are the pure functions ---------------------------------------------------------


def same(a: Routing, b: Routing) -> bool:
    return all(
        torch.equal(getattr(a, f.name), getattr(b, f.name))
        if getattr(a, f.name) is not None
        else getattr(b, f.name) is None
        for f in dataclasses.fields(Routing)
    )


def test_specs_call_the_pure_functions():
    lg = logits()
    assert same(
        TopK(k=1, renormalize=False)(lg, training=True), routing.top_k(lg, 1, renormalize=False)
    )
    assert same(TopP(p=0.3, rule="code")(lg, training=False), routing.top_p(lg, 0.3, rule="code"))
    assert same(
        Adaptive(0.2, "normalized")(lg, training=True), routing.adaptive(lg, 0.2, "normalized")
    )
    gw = GWBroadcast(TopK(k=1, renormalize=True), threshold=0.5, max_slots=2)
    assert same(
        gw(lg, training=True, seq_len=8),
        routing.gw_broadcast(routing.top_k(lg, 1), 0.5, max_slots=2, seq_len=8),
    )
    assert same(gw(lg, training=False), routing.top_k(lg, 1))  # inference is the base router
    noise = torch.zeros_like(lg)
    assert same(
        NoisyTopK(k=2)(torch.cat([lg, noise], 1), training=False),
        routing.noisy_top_k(lg, noise, 2, training=False),
    )


def test_specs_carry_their_papers_loss_recipe():
    assert (TopP().balance_count, TopP().dynamic_coef) == ("selected", 1e-4)
    assert (Adaptive().balance_count, Adaptive().dynamic_coef) == ("first", 0.0)
    assert all(
        spec.paper_losses["z_coef"] == 0 for spec in (TopK(), TopP(), Adaptive(), GWBroadcast())
    )
    assert GWBroadcast().paper_losses["balance_coef"] == 1e-3  # the released GW code's aux loss
    assert GWBroadcast(TopP()).balance_count == "selected"  # GW keeps its base router's counting
    paper = MoEConfig(router=TopP()).with_paper_losses()
    assert (paper.balance_coef, paper.z_coef, paper.dynamic_beta, paper.balance_counts) == (
        1e-2,
        0.0,
        1e-4,
        "selected",
    )
    course = MoEConfig(router=TopP())  # the course's defaults keep the ST-MoE z-loss
    assert (course.z_coef, course.dynamic_beta) == (1e-3, 1e-4)
    assert (
        MoEConfig(router=TopP(), dynamic_coef=0.0, balance_count="first").balance_counts == "first"
    )


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 40),
    st.integers(0, 10_000),
    st.sampled_from(range(len(SPECS))),
)
def test_every_spec_gives_a_valid_decision(E, T, seed, which):
    spec = SPECS[which]
    try:
        routing.check_experts(spec, E)
    except ValueError:
        return  # k > E or a threshold above ln E: refused, see above
    width = routing.router_columns(spec, E)
    lg = 3 * torch.randn(T, width, generator=torch.Generator().manual_seed(seed))
    r = spec(lg, training=True, seq_len=None)
    assert r.mask.shape == r.weights.shape == (T, E)
    assert r.mask.any(1).all()  # every token has an expert
    assert (r.weights[~r.mask] == 0).all() and (r.weights >= 0).all()
    assert torch.allclose(r.probs.sum(1), torch.ones(T))


# ---- one rule for ties ----------------------------------------------------------------------


def test_ties_go_to_the_lowest_index_everywhere():
    lg = torch.tensor([[1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 0.0, 0.0]])
    first = routing.top_expert(lg.softmax(-1))
    assert first.tolist() == [1, 0]
    for r in (routing.top_k(lg, 1), routing.adaptive(lg, 0.0), routing.top_p(lg, 0.01)):
        assert r.mask.float().argmax(1).tolist() == first.tolist() and r.mask.sum(1).tolist() == [
            1,
            1,
        ]
    assert routing.top_k(lg, 2).mask[0].tolist() == [False, True, True, False]
    # the Switch balance loss counts the same first choices: expert 1 and expert 0 once each
    probs = lg.softmax(-1)
    f = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert load_balance_loss(probs).item() == pytest.approx(4 * (f * probs.mean(0)).sum().item())


# ---- names exist only for the command line and files ------------------------------------------


def test_registry_round_trip_and_errors():
    for spec in SPECS:
        assert routing.router_from_dict(routing.router_to_dict(spec)) == spec
    assert routing.router_from_name("top_p", p=0.3) == TopP(p=0.3)
    with pytest.raises(
        ValueError,
        match=r"unknown router 'bogus'; choose from \['adaptive', 'capacity_top_k', 'expert_choice'",
    ):
        routing.router_from_name("bogus")
    with pytest.raises(ValueError, match=r"has no setting \['k'\]"):
        routing.router_from_name("top_p", k=2)
    with pytest.raises(TypeError, match="only the registered routers"):
        routing.router_to_dict(FirstExpert())
    config = MoEConfig(router=GWBroadcast(TopP(p=0.3), threshold=0.6))
    assert MoEConfig.from_dict(config.to_dict()) == config
    assert ModelConfig(**ModelConfig(moe=config).to_dict()).moe == config


# ---- a router written outside the library ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FirstExpert:
    """Every token to expert 0 with weight 1 (a router a reader might write in a notebook)."""

    def __call__(self, logits, *, training, seq_len=None):
        probs = logits.float().softmax(-1)
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[:, 0] = True
        return Routing(logits=logits.float(), probs=probs, mask=mask, weights=mask * probs)


def test_a_router_defined_here_trains_in_moe_and_transformer():
    torch.manual_seed(0)
    toy = MoERegressor(8, 2, MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=FirstExpert()))
    x, y = torch.randn(64, 8), torch.randn(64, 2)
    out = toy(x)
    assert out.layers[0].stats.tokens_per_expert.tolist() == [64, 0, 0, 0]
    before = toy.moe.experts.gate_up.detach().clone()
    history = train(toy, lambda g: {"x": x, "y": y}, TrainConfig(steps=30, lr=1e-2, progress=False))
    assert history.loss[-1] < history.loss[0]
    changed = (toy.moe.experts.gate_up.detach() - before).abs().sum(dim=(1, 2))
    assert changed[0] > 0 and (changed[1:] == 0).all()  # only the expert it routes to learns

    lm = TinyTransformer(
        ModelConfig(
            vocab_size=16,
            block_size=8,
            moe=MoEConfig(d_model=16, d_hidden=16, num_experts=4, router=FirstExpert()),
        )
    )
    idx = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    history = train(
        lm, lambda g: {"idx": idx, "targets": idx}, TrainConfig(steps=20, lr=1e-2, progress=False)
    )
    assert history.loss[-1] < history.loss[0]
    assert all(m.routing.mask[:, 0].all() for m in lm(idx).layers)


def test_a_router_that_returns_a_wrong_shape_is_refused():
    def bad(logits, *, training, seq_len=None):
        return routing.top_k(logits[:, :2], 1)

    with pytest.raises(ValueError, match=r"mask of shape \(5, 2\)"):
        MoE(MoEConfig(d_model=4, d_hidden=4, num_experts=4, router=bad))(torch.randn(5, 4))


def _nan_at_0(t):
    return t.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(math.nan))


# a valid top-2 decision, spoilt in one field -> (error type, the words that name the field)
SPOILT = {
    "nan_weights": (
        lambda r: dataclasses.replace(r, weights=_nan_at_0(r.weights)),
        ValueError,
        "non-finite Routing.weights",
    ),
    "weights_outside_mask": (
        lambda r: dataclasses.replace(r, weights=r.probs),
        ValueError,
        "Routing.weights outside Routing.mask",
    ),
    "zero_weights": (
        lambda r: dataclasses.replace(r, weights=torch.zeros_like(r.weights)),
        ValueError,
        "all-zero Routing.weights",
    ),
    "nan_probs": (
        lambda r: dataclasses.replace(r, probs=_nan_at_0(r.probs)),
        ValueError,
        "non-finite Routing.probs",
    ),
    "inf_logits": (
        lambda r: dataclasses.replace(r, logits=r.logits.clone().fill_(math.inf)),
        ValueError,
        "non-finite Routing.logits",
    ),
    "weights_shape": (
        lambda r: dataclasses.replace(r, weights=r.weights[:, :2]),
        ValueError,
        r"Routing.weights of shape \(5, 2\), expected \(5, 4\)",
    ),
    "no_logits": (
        lambda r: dataclasses.replace(r, logits=None),
        TypeError,
        "Routing.logits=None, not a tensor",
    ),
    "float_mask": (
        lambda r: dataclasses.replace(r, mask=r.mask.float()),
        TypeError,
        "Routing.mask of dtype torch.float32, not bool",
    ),
    "broadcast_shape": (
        lambda r: dataclasses.replace(r, broadcast=r.mask),
        ValueError,
        r"Routing.broadcast of shape \(5, 4\), expected \(5,\)",
    ),
    "not_a_routing": (lambda r: (r.mask, r.weights), TypeError, "returned tuple, not a Routing"),
}


@pytest.mark.parametrize("case", SPOILT)
def test_a_custom_routers_decision_is_checked_naming_the_field(case):
    spoil, error, words = SPOILT[case]

    def bad(logits, *, training, seq_len=None):
        return spoil(routing.top_k(logits, 2))

    layer = MoE(MoEConfig(d_model=4, d_hidden=4, num_experts=4, router=bad))
    with pytest.raises(error, match=words):
        layer(torch.randn(5, 4))


def test_a_nan_in_the_balancing_bias_is_refused_not_routed_to_no_expert():
    layer = MoE(MoEConfig(d_model=4, d_hidden=4, num_experts=4, router=routing.SigmoidTopK()))
    layer.router_state.bias[1] = math.nan
    with pytest.raises(ValueError, match="bias of sigmoid_top_k .* not finite"):
        layer(torch.randn(5, 4))


@dataclasses.dataclass(frozen=True)
class RebindingTopK(TopK):
    """A stateful router whose update rebinds its state (state["seen"] = ...), not in place."""

    def init_state(self, num_experts):
        return {"seen": torch.zeros(num_experts)}

    def __call__(self, logits, *, training, seq_len=None, state):
        return routing.top_k(logits, self.k)

    def update_state(self, state, stats):
        state["seen"] = state["seen"] + stats.tokens_per_expert


def test_an_update_that_rebinds_the_state_is_kept():
    layer = MoE(MoEConfig(d_model=4, d_hidden=4, num_experts=4, router=RebindingTopK(k=2)))
    layer.update_router_state(layer(torch.randn(5, 4)).stats)
    assert layer.router_state.seen.sum() == 10  # 5 tokens, 2 experts each


def test_an_update_that_changes_the_states_shape_is_refused():
    class Growing(RebindingTopK):
        def update_state(self, state, stats):
            state["seen"] = torch.zeros(7)

    layer = MoE(MoEConfig(d_model=4, d_hidden=4, num_experts=4, router=Growing(k=2)))
    with pytest.raises(ValueError, match=r"state\['seen'\] to shape \(7,\)"):
        layer.update_router_state(layer(torch.randn(5, 4)).stats)


# ---- a router with state that gradients do not train ------------------------------------------


@dataclasses.dataclass(frozen=True)
class CountingTopK:
    """Top-k that counts every token routed to each expert over training (a toy stateful router)."""

    k: int = 1

    def init_state(self, num_experts):
        return {"seen": torch.zeros(num_experts)}

    def __call__(self, logits, *, training, seq_len=None, state):
        return routing.top_k(logits, self.k)

    def update_state(self, state, stats):
        state["seen"] += stats.tokens_per_expert


def counting_model(seed=0):
    torch.manual_seed(seed)
    return MoERegressor(
        8, 2, MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=CountingTopK())
    )


def batches(g):
    return {"x": torch.randn(16, 8, generator=g), "y": torch.randn(16, 2, generator=g)}


def test_state_updates_once_per_step_after_the_optimizer_and_never_in_forward():
    model = counting_model()
    layer = moe_layers(model)[0]
    assert "moe.router_state.seen" in model.state_dict()  # saved and moved with the model
    assert not any(b.requires_grad for b in layer.router_state.buffers())
    x = torch.randn(16, 8)
    model(x)
    model(x)  # a cell run twice
    assert layer.router_state.seen.sum() == 0
    per_step = []
    train(
        model,
        batches,
        TrainConfig(steps=5, progress=False),
        callback=lambda step, m, out: per_step.append(
            out.layers[0].stats.tokens_per_expert.clone()
        ),
    )
    assert torch.equal(layer.router_state.seen, torch.stack(per_step).sum(0).float())
    assert layer.router_state.seen.sum() == 5 * 16


def test_set_router_swaps_configs_without_touching_shared_ones():
    torch.manual_seed(0)
    shared = MoEConfig(d_model=16, router=TopK())
    a = TinyTransformer(ModelConfig(vocab_size=16, block_size=8, moe=shared))
    b = TinyTransformer(ModelConfig(vocab_size=16, block_size=8, moe=shared))
    set_router(a, Adaptive(threshold=0.3))
    assert all(m.config.router == Adaptive(threshold=0.3) for m in moe_layers(a))
    assert a.config.moe.router == Adaptive(threshold=0.3)
    assert all(m.config.router == TopK() for m in moe_layers(b)) and shared.router == TopK()
    with pytest.raises(ValueError, match="router outputs"):
        set_router(a, NoisyTopK())  # needs noise weights this model does not have


# ---- GW broadcast and capacity ---------------------------------------------------------------


def test_gw_capacity_counts_base_pairs_and_never_drops_broadcast_pairs():
    lg = logits(T=8, E=4, seed=3)
    base = routing.top_k(lg, 1)
    gw = routing.gw_broadcast(
        base, threshold=0.0, max_slots=2, seq_len=8
    )  # first 2 tokens broadcast
    kept = kept_pairs(gw, capacity_factor=1.0)  # capacity ceil(8 / 4) = 2, not ceil(14 / 4) = 4
    bcast = gw.broadcast
    assert bcast.tolist() == [True, True] + [False] * 6
    assert kept[bcast].all()  # every broadcast pair kept
    assert (kept[~bcast].sum(0) <= 2).all()
    expected = apply_capacity(base.mask & ~bcast[:, None], base.probs, 2)
    assert torch.equal(kept[~bcast], expected[~bcast])


def test_uncertain_ratio_is_before_the_slot_cap_and_broadcast_ratio_after():
    moe = MoE(
        MoEConfig(
            d_model=4,
            d_hidden=4,
            num_experts=4,
            router=GWBroadcast(TopK(), threshold=0.0, max_slots=1),
        )
    ).train()
    stats = moe(torch.randn(2, 5, 4)).stats
    assert stats.uncertain_ratio.item() == 1.0  # the released code's gw_ratio
    assert stats.broadcast_ratio.item() == pytest.approx(1 / 5)  # one slot per 5-token sequence
    assert math.isclose(
        MoE(MoEConfig(d_model=4)).eval()(torch.randn(3, 4)).stats.uncertain_ratio.item(), 0
    )


# ---- second, independent checks of rules a single test used to pin ----------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_adaptive_two_experts_exactly_when_the_gap_is_at_most_the_threshold(seed):
    lg = logits(T=1, E=6, seed=seed, scale=1.0)
    p1, p2 = lg.softmax(-1).topk(2).values[0]
    gap = (p1 - p2).item()  # the float the rule compares
    if not 0 < gap < 1:
        return
    assert routing.adaptive(lg, threshold=gap).mask.sum().item() == 2  # gap <= T: both
    below = torch.nextafter(p1 - p2, torch.zeros(())).item()  # the next float32 down
    assert routing.adaptive(lg, threshold=below).mask.sum().item() == 1


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_capacity_priority_first_choices_then_earlier_tokens(seed, capacity):
    r = routing.top_k(logits(T=24, E=4, seed=seed), 2)
    kept = apply_capacity(r.mask, r.probs, capacity)
    order = r.probs.argsort(dim=1, descending=True, stable=True)
    first = torch.zeros_like(r.mask).scatter_(1, order[:, :1], True)
    for e in range(4):
        firsts, seconds = r.mask[:, e] & first[:, e], r.mask[:, e] & ~first[:, e]
        kept_first, kept_second = kept[:, e] & firsts, kept[:, e] & seconds
        assert kept[:, e].sum() == min(capacity, int(r.mask[:, e].sum()))
        if kept_second.any():  # a second choice got a slot only after every first choice did
            assert torch.equal(kept_first, firsts)
        for chosen, kept_rank in ((firsts, kept_first), (seconds, kept_second)):
            idx = chosen.nonzero().squeeze(1)
            n = int(kept_rank.sum())
            assert kept_rank[idx[:n]].all() and not kept_rank[idx[n:]].any()  # earlier tokens first


def test_noise_only_in_training_in_the_layer():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=8, router=NoisyTopK(k=2)))
    x = torch.randn(64, 8)
    moe.eval()
    clean = routing.top_k(moe.router_logits(x)[:, :8], 2).mask
    assert all(torch.equal(moe(x).routing.mask, clean) for _ in range(3))
    moe.train()
    assert any(not torch.equal(moe(x).routing.mask, clean) for _ in range(3))


# ---- bad input to the functions ----------------------------------------------------------------


@pytest.mark.parametrize(
    "call, text",
    [
        (lambda: routing.entropy(torch.randn(4, 8)), "must be probabilities"),  # logits by mistake
        (lambda: routing.normalized_entropy(-torch.ones(2, 2)), "must be probabilities"),
        (lambda: routing.is_uncertain(torch.full((2, 4), 0.25), float("nan")), "threshold=nan"),
        (lambda: routing.is_uncertain(torch.full((2, 4), 0.25), -0.1), "threshold=-0.1"),
        (lambda: routing.is_uncertain(torch.full((2, 4), 0.25), 1.5), "threshold=1.5"),
        (
            lambda: routing.is_uncertain(torch.full((2, 4), 0.25), 1.5, "entropy"),
            "threshold=1.5",
        ),  # ln 4 = 1.39
        (lambda: routing.gw_broadcast(routing.top_k(logits(), 2), 0.5, seq_len=0), "seq_len=0"),
        (lambda: routing.gw_broadcast(routing.top_k(logits(), 2), 0.5, seq_len=5), "seq_len=5"),
        (lambda: routing.top_k(logits(), 2, renormalize="no"), "renormalize='no'"),
        (lambda: routing.adaptive(logits(), 0.1, renormalize=1), "renormalize=1"),
        (lambda: routing.noisy_top_k(logits(), logits(), 2, training="yes"), "training='yes'"),
    ],
)
def test_bad_function_input_raises_naming_the_value(call, text):
    with pytest.raises((ValueError, TypeError), match=re.escape(text)):
        call()


def test_entropy_accepts_bfloat16_probabilities():
    p = logits(T=64, E=64).softmax(-1).bfloat16()
    assert torch.allclose(routing.entropy(p).float(), routing.entropy(p.float()), atol=0.05)


def test_old_first_choice_name_warns_and_gives_the_same_experts():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.5, 0.0]])
    with pytest.warns(DeprecationWarning, match="top_expert"):
        assert routing.first_choice(probs).tolist() == routing.top_expert(probs).tolist() == [1, 0]


# ---- renormalized top-1: a weight of 1 and no router gradient --------------------------------


@pytest.mark.parametrize("spec", [TopK, routing.SigmoidTopK])
def test_top_1_left_renormalized_warns_and_points_to_switch(spec):
    with pytest.warns(UserWarning, match=r"renormalize=False \(Switch"):
        made = spec(k=1)
    assert made.renormalize is True  # the numbers are unchanged: the warning is the change
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spec(k=1, renormalize=True) == made  # said on purpose: silent
        spec(k=1, renormalize=False)
        assert spec().renormalize is True and spec() == spec(renormalize=True)


def test_renormalized_top_1_really_gives_the_router_no_gradient():
    """What the warning says, measured: the task loss reaches the router only without it."""
    grads = {}
    for renormalize in (True, False):
        torch.manual_seed(0)
        router = TopK(k=1, renormalize=renormalize)
        moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=router))
        moe(torch.randn(16, 8)).output.square().mean().backward()
        grads[renormalize] = moe.gate.weight.grad.abs().sum().item()
    assert grads[True] < 1e-6 * grads[False]  # rounding only: no path through g = 1


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"router": "top_k", "k": 2}, "router=TopK(k=2)"),
        ({"router": "top_p", "top_p": 0.4}, "router=TopP(p=0.4)"),
        ({"k": 1}, "router=TopK(k=1)"),
    ],
)
def test_config_with_flat_router_settings_says_routers_are_specs(kwargs, text):
    with pytest.raises(TypeError, match=re.escape(text)):
        MoEConfig(**kwargs)


def test_a_custom_base_under_gw_broadcast_is_checked_too():
    def nan_weights(logits, *, training, seq_len=None):
        r = routing.top_k(logits, 2)
        return dataclasses.replace(r, weights=r.weights * math.nan)

    gw = GWBroadcast(nan_weights, threshold=1.0)  # no token broadcast: the base's weights stay
    with pytest.raises(ValueError, match="non-finite Routing.weights"):
        MoE(MoEConfig(d_model=4, d_hidden=4, num_experts=4, router=gw))(torch.randn(5, 4))

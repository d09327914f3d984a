"""The released models' rules (minimoe/routing/zoo.py, capacity.py, hashing.py): hand-worked
values, properties and refusals; tests/test_families.py checks them against Hugging Face."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe import MoE, MoEConfig, routing
from minimoe.model import ModelConfig, TinyTransformer
from minimoe.routing import (
    CapacityTopK,
    HashTopK,
    ScoreTopK,
    SparseMixer,
    TopK,
    capacity_top_k,
    hash_top_k,
    jittered,
    score_top_k,
    sparse_mixer,
    top_k,
)
from minimoe.routing.sparsemixer import exponential_at


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- hand-worked values ---------------------------------------------------------------------


def test_softmax_rule_is_top_k_bit_for_bit():
    logits = rand(64, 8)
    assert torch.equal(score_top_k(logits, 2).weights, top_k(logits, 2).weights)
    assert torch.equal(
        score_top_k(logits, 3, renormalize=False).weights, top_k(logits, 3, False).weights
    )


def test_top_k_of_logits_then_softmax():
    r = score_top_k(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), 2, score="logits", weight="softmax",
                    renormalize=False)  # fmt: skip
    e = math.e
    torch.testing.assert_close(r.weights, torch.tensor([[e / (e + 1), 1 / (e + 1), 0.0, 0.0]]))


def test_top_k_then_softmax_has_the_gradient_of_renormalized_softmax_top_k():
    """exp(l_i) / sum_S exp(l_j) either way: the same function, so the same gradient; only
    top-k of the softmax without renormalization differs (the other logits stay in P_i)."""
    logits = rand(32, 8).requires_grad_()
    mix = rand(32, 8, seed=1)

    def grad(**rule):
        (score_top_k(logits, 2, **rule).weights * mix).sum().backward()
        g, logits.grad = logits.grad.clone(), None
        return g

    then_softmax = grad(score="logits", weight="softmax", renormalize=False)
    torch.testing.assert_close(then_softmax, grad(), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(then_softmax, grad(renormalize=False), atol=1e-3)


def test_the_bias_selects_and_never_weighs():
    bias = torch.tensor([0.0, 1.0, 0.0, 2.0], requires_grad=True)
    r = score_top_k(torch.zeros(1, 4), 2, score="sigmoid", bias=bias)
    assert r.mask.tolist() == [[False, True, False, True]]
    assert r.weights.tolist() == [[0.0, 0.5, 0.0, 0.5]]  # sigmoid(0) renormalized
    assert not r.weights.requires_grad  # no path from the bias to the weights


def test_p_norm_floor_soft_cap_and_sqrt_softplus():
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    pnorm = score_top_k(probs.log(), 2, norm_p=2.0).weights  # DBRX
    torch.testing.assert_close(pnorm, torch.tensor([[0.6, 0.3, 0.0]]) / math.sqrt(0.45))
    floor = score_top_k(probs.log(), 1, norm_min=0.75).weights  # ERNIE: max(sum, floor)
    torch.testing.assert_close(floor, torch.tensor([[0.6 / 0.75, 0.0, 0.0]]))
    capped = score_top_k(torch.tensor([[10.0, 0.0]]), 1, score="sigmoid", softcap=3.0)
    torch.testing.assert_close(capped.logits, torch.tensor([[3 * math.tanh(10 / 3), 0.0]]))
    root = score_top_k(torch.tensor([[1.0, 0.0]]), 1, score="sqrt_softplus", renormalize=False)
    assert root.weights[0, 0].item() == pytest.approx(math.sqrt(math.log1p(math.e)))


def test_gemmas_normed_router_input_and_expert_scales():
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5: x / sqrt(12.5) / sqrt(2) = x / 5
    normed = routing.normed_router_input(x, torch.tensor([1.0, 2.0]), eps=0.0)
    torch.testing.assert_close(normed, torch.tensor([[0.6, 1.6]]))
    tokens = rand(6, 8)
    scale = rand(8, seed=1)
    torch.testing.assert_close(  # the token's own scale is gone (up to eps)
        routing.normed_router_input(7 * tokens, scale), routing.normed_router_input(tokens, scale)
    )
    logits, c = rand(5, 4), torch.tensor([0.5, 2.0, 1.0, 3.0])
    scaled = score_top_k(logits, 2, expert_scale=c)
    torch.testing.assert_close(scaled.weights, score_top_k(logits, 2).weights * c)
    assert torch.equal(scaled.mask, top_k(logits, 2).mask)  # scales weigh, never select


def test_the_routers_trained_tensors_are_parameters_of_the_layer():
    from minimoe.train import routers

    rule = ScoreTopK(k=2, input_norm=True, expert_scales=True)
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=rule))
    assert {n for n, _ in moe.named_parameters()} >= {
        "router_params.input_scale",
        "router_params.expert_scale",
    }
    assert not list(moe.router_state.named_buffers())  # trained, not state
    moe(rand(2, 5, 8)).output.pow(2).sum().backward()
    assert moe.router_params.input_scale.grad.abs().sum() > 0
    assert moe.router_params.expert_scale.grad.abs().sum() > 0
    assert moe.router_params in routers(moe)  # freeze_router freezes them with the gate
    with torch.no_grad():
        moe.router_params.expert_scale.fill_(2.0)
    moe.replace_config(router=ScoreTopK(k=1, input_norm=True, expert_scales=True))
    assert moe.router_params.expert_scale.eq(2.0).all()  # the same tensors: kept
    moe.replace_config(router=ScoreTopK(k=1))
    assert not list(moe.router_params.parameters())
    assert routers(moe) == [moe.gate]


def test_groups_by_max_and_by_the_sum_of_two_differ():
    logits = torch.tensor([[3.0, -5.0, 2.5, 2.5]])  # group 0 has the best expert, group 1 two good
    by_max = score_top_k(logits, 2, n_group=2, topk_group=1, group_score="max")
    by_sum = score_top_k(logits, 2, n_group=2, topk_group=1)
    assert by_max.mask.tolist() == [[True, True, False, False]]
    assert by_sum.mask.tolist() == [[False, False, True, True]]


def test_capacity_counts_first_choices_first_per_sequence():
    logits = torch.tensor([[2.0, 0.0]] * 4)  # every token prefers expert 0
    one = capacity_top_k(logits, 1, capacity=1, normalize="none")
    assert one.mask[:, 0].tolist() == [True, False, False, False]
    per_seq = capacity_top_k(logits, 1, capacity=1, seq_len=2, normalize="none")
    assert per_seq.mask[:, 0].tolist() == [True, False, True, False]
    two = capacity_top_k(logits, 2, capacity=2)  # second choices wait for every first choice
    assert two.mask.tolist() == [[True, True], [True, True], [False, False], [False, False]]
    assert two.weights[0].tolist() == pytest.approx(torch.softmax(logits[0], 0).tolist())


def test_capacity_by_priority_gives_the_slots_to_the_most_confident_tokens():
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]])  # all prefer expert 0, one slot
    in_order = capacity_top_k(logits, 1, capacity=1, normalize="none")
    by_priority = capacity_top_k(logits, 1, capacity=1, normalize="none", prioritized=True)
    assert in_order.mask[:, 0].tolist() == [True, False, False]
    assert by_priority.mask[:, 0].tolist() == [False, True, False]  # P_max 0.95 > 0.88 > 0.73
    two = capacity_top_k(logits, 1, capacity=2, normalize="none", prioritized=True)
    assert two.mask[:, 0].tolist() == [False, True, True]


def test_nllbs_second_expert_policies():
    """'sampling': the second is drawn from the softmax of the other logits (Gumbel-max), its
    weight still its P; 'random': kept with probability min(1, 2 g), g its weight before the drops
    (P_2, or P_2 / (P_1 + P_2) normalized first). 4000 copies of one token, no capacity limit."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).expand(4000, 4)
    p = logits[0].softmax(0)
    torch.manual_seed(0)
    sampled = capacity_top_k(logits, 2, capacity=4000, second="sampling")
    assert sampled.mask[:, 0].all()  # the first is the best, always
    share = sampled.mask[:, 1:].float().mean(0)
    want = logits[0, 1:].softmax(0)
    assert ((share - want).abs() <= 4 * (want * (1 - want) / 4000).sqrt()).all(), (share, want)
    picked = sampled.mask.clone()
    picked[:, 0] = False
    e = picked.float().argmax(1)
    torch.testing.assert_close(sampled.weights[:, 0], p[0] / (p[0] + p[e]))
    for normalize, g in (("after_drop", p[1]), ("before_drop", p[1] / (p[0] + p[1]))):
        kept = capacity_top_k(logits, 2, capacity=4000, normalize=normalize, second="random")
        rate, want = kept.mask[:, 1].float().mean(), min(1.0, 2 * g)
        assert abs(rate - want) <= 4 * (want * (1 - want) / 4000) ** 0.5, (normalize, rate, want)
        alone = ~kept.mask[:, 1]  # dropped at random: the first's weight as normalized
        first = 1.0 if normalize == "after_drop" else float(p[0] / (p[0] + p[1]))
        torch.testing.assert_close(kept.weights[alone, 0], torch.full((int(alone.sum()),), first))
    with pytest.raises(ValueError, match="second_expert='random' .* k=2, got k=1"):
        CapacityTopK(k=1, second_expert="random")
    with pytest.raises(ValueError, match="second"):
        capacity_top_k(logits, 2, 8, second="best")


def test_capacity_renormalizes_after_the_drop():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 2.0, -1.0], [2.0, 1.0, -1.0]])
    after = capacity_top_k(logits, 2, capacity=1)  # token 2 loses both experts
    before = capacity_top_k(logits, 2, capacity=1, normalize="before_drop")
    assert after.mask[2].tolist() == [False, False, False] and after.weights[2].sum() == 0
    assert after.weights[0].sum().item() == pytest.approx(1.0)  # lost its second: g = 1
    assert before.weights[0].sum().item() < 1.0


def test_sparse_mixer_rounds():
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    narrow = sparse_mixer(logits, 2, jitter_eps=0.01)  # 1.9 is 5% below 2: masked, g = 1
    assert narrow.weights.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    wide = sparse_mixer(logits, 2, jitter_eps=0.1)  # within 20%: round 1 shares with 1.9
    torch.testing.assert_close(wide.weights, torch.tensor([[1 / (1 + math.exp(-0.1)), 1, 0, 0]]))


def test_sparse_mixer_samples_in_training_as_the_softmax_over_its_candidates():
    """k = 1 over 4000 copies of one token: every logit is a candidate (eps = 1), the pick
    follows p = softmax, and a pick that is not the best weighs p / 3 three times in four."""
    logits = torch.tensor([[1.0, 0.9, 0.5, -2.0]]).expand(4000, 4)
    p = logits[0].softmax(0)
    r = sparse_mixer(logits, 1, 1.0, training=True, generator=torch.Generator().manual_seed(0))
    share = r.mask.float().mean(0)
    assert ((share - p).abs() <= 4 * (p * (1 - p) / 4000).sqrt()).all(), (share, p)
    picked = r.mask.float().argmax(1)  # (T,) the one expert of each token
    g = r.weights.gather(1, picked[:, None])[:, 0]
    best = picked == 0
    torch.testing.assert_close(g[best], p[0].expand(int(best.sum())))  # the best: c = 1
    third = torch.isclose(g[~best], p[picked[~best]] * 0.3333)
    assert abs(third.float().mean() - 0.75) < 4 * (0.75 * 0.25 / int((~best).sum())) ** 0.5


def test_sparse_mixer_in_training_with_eps_0_is_the_inference_rule_and_has_its_gradient():
    logits = rand(64, 8).requires_grad_()
    inference = sparse_mixer(logits, 2, 0.0)
    training = sparse_mixer(logits, 2, 0.0, training=True)  # one candidate per round
    assert torch.equal(training.mask, inference.mask)
    assert torch.equal(training.weights, inference.weights)
    # a sampled pick with c = 1/3: the value is c p(e), the gradient that of p(e) alone
    one = torch.tensor([[0.0, 0.1, -0.2]], requires_grad=True)
    for seed in range(50):
        r = sparse_mixer(one, 1, 5.0, training=True, generator=torch.Generator().manual_seed(seed))
        e = int(r.mask[0].float().argmax())
        p = one.detach().softmax(1)[0]
        if e != 0 and r.weights[0, e] < 0.5 * p[e]:
            break
    else:
        raise AssertionError("no seed gave a non-best pick weighted 1/3")
    (grad,) = torch.autograd.grad(r.weights[0, e], one)
    torch.testing.assert_close(grad[0], p[e] * (torch.eye(3)[e] - p))


def test_sparse_mixer_draws_from_the_generator_it_is_given():
    logits = rand(32, 8)
    state = torch.get_rng_state()
    a = sparse_mixer(logits, 2, 0.5, training=True, generator=torch.Generator().manual_seed(4))
    b = sparse_mixer(logits, 2, 0.5, training=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator untouched
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weights, b.weights)
    greedy = SparseMixer(jitter_eps=0.5, sample_in_training=False)
    assert torch.equal(greedy(logits, training=True).mask, sparse_mixer(logits, 2, 0.5).mask)


def test_sparse_mixer_draws_exponential_numbers_bit_for_bit():
    """On CPU the Gumbel draws skip torch's serial ``exponential_`` kernel (float64 uniforms, a
    vectorized log1p, only at the candidates): the same float32 numbers, a million of them,
    and the generator left where the kernel leaves it."""
    shape = (4096, 256)
    kernel, fast = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected = torch.empty(shape).exponential_(generator=kernel)
    every = torch.ones(shape, dtype=torch.bool).nonzero(as_tuple=True)
    assert torch.equal(exponential_at(shape, every, fast), expected.flatten())
    assert torch.equal(torch.rand(4, generator=fast), torch.rand(4, generator=kernel))
    some = (rand(*shape) > 1.5).nonzero(as_tuple=True)  # the candidates only
    assert torch.equal(
        exponential_at(shape, some, torch.Generator().manual_seed(3)), expected[some]
    )


# ---- input jitter: a router option the layer applies in training ---------------------------


def test_jitter_by_hand():
    """x times U(1 - eps, 1 + eps) per element, drawn as Hugging Face's blocks draw it (one
    ``uniform_`` of x's shape per draw, torch's global generator): 2 draws, eps 0.5."""
    x = torch.tensor([[1.0, -2.0], [4.0, 0.5]])
    torch.manual_seed(0)
    u1 = torch.empty(2, 2).uniform_(0.5, 1.5)
    u2 = torch.empty(2, 2).uniform_(0.5, 1.5)
    torch.manual_seed(0)
    assert torch.equal(jittered(x, 0.5, draws=2), x * u1 * u2)
    assert ((jittered(x, 0.5) / x - 1).abs() <= 0.5).all()
    assert torch.equal(jittered(x, 0.0), x)


def jitter_layer(**router) -> MoE:
    torch.manual_seed(0)
    return MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=TopK(**router)))


@pytest.mark.parametrize("experts_see_it", [True, False])
def test_jitter_in_training_only_and_who_sees_it(experts_see_it):
    """The router always reads the jittered tokens; the experts too with ``jitter_experts``.
    Written out: y = sum_e g_e(jittered x) Expert_e(x or jittered x)."""
    moe = jitter_layer(input_jitter=0.3, jitter_experts=experts_see_it)
    plain = jitter_layer()
    x = rand(2, 6, 8)
    torch.manual_seed(4)
    out = moe(x)
    torch.manual_seed(4)
    noisy = jittered(x.reshape(12, 8), 0.3)
    routing = plain.route(noisy)
    assert torch.equal(out.routing.mask, routing.mask)
    torch.testing.assert_close(out.routing.weights, routing.weights)
    runs = plain.experts.dense(noisy if experts_see_it else x.reshape(12, 8))  # (T, E, d)
    by_hand = (routing.weights[:, :, None] * runs).sum(1)
    torch.testing.assert_close(out.output.reshape(12, 8), by_hand, atol=1e-6, rtol=1e-5)
    assert not torch.equal(out.routing.weights, plain(x).routing.weights)  # the jitter acts
    assert torch.equal(moe.eval()(x).output, plain.eval()(x).output)  # and not at evaluation


def test_gw_broadcast_jitters_as_its_base():
    base = TopK(input_jitter=0.3, jitter_experts=False)
    gw = routing.GWBroadcast(base, threshold=0.99)  # no token is that uncertain
    x = rand(2, 6, 8)
    outs = []
    for router in (base, gw):
        moe = jitter_layer()
        moe.replace_config(router=router)
        torch.manual_seed(4)
        outs.append(moe(x).output)
    assert torch.equal(outs[0], outs[1])


def test_jitter_same_seed_same_numbers():
    moe = jitter_layer(input_jitter=0.3)
    x = rand(2, 6, 8)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        out = moe(x)
        (grad,) = torch.autograd.grad(out.output.sum() + out.aux_loss, moe.gate.weight)
        runs.append((out.output, grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_hash_routing_reads_the_table():
    r = hash_top_k(torch.zeros(2, 4), torch.tensor([[0, 3], [2, 1]]), score="sigmoid")
    assert r.mask.tolist() == [[True, False, False, True], [False, True, True, False]]
    assert r.weights[r.mask].tolist() == [0.5] * 4


# ---- properties -----------------------------------------------------------------------------

RULES = [
    ScoreTopK(k=3),
    ScoreTopK(score="logits", weight="softmax", renormalize=False),
    ScoreTopK(score="logits", weight="sigmoid", selection_bias=True),
    ScoreTopK(score="sigmoid", selection_bias=True, n_group=4, topk_group=2, scaling=2.5),
    ScoreTopK(score="sqrt_softplus", selection_bias=True, norm_eps=1e-20, softcap=2.0),
    ScoreTopK(n_group=4, topk_group=1, group_score="max", renormalize=False, norm_p=2.0),
    CapacityTopK(k=2, expert_capacity=5),
    CapacityTopK(k=1, expert_capacity=3, per_sequence=True, normalize="none"),
    SparseMixer(k=3, jitter_eps=0.05),
    ScoreTopK(k=3, input_norm=True, expert_scales=True),
]


@pytest.mark.parametrize("rule", RULES, ids=[f"{type(r).__name__}{i}" for i, r in enumerate(RULES)])
def test_weights_vanish_outside_the_selection_and_groups_hold(rule):
    logits = rand(40, 8)
    init = getattr(rule, "init_state", lambda num_experts: {})
    trained = getattr(rule, "init_params", lambda num_experts, d_model: {})
    state = {k: torch.randn(v.shape) for k, v in init(8).items()}
    state |= {k: torch.rand(v.shape) + 0.5 for k, v in trained(8, 16).items()}  # scales > 0
    r = rule(logits, training=True, seq_len=10, **({"state": state} if state else {}))
    assert torch.equal(r.weights[~r.mask], torch.zeros((~r.mask).sum()))
    assert (r.weights[r.mask] >= 0).all()
    assert (r.mask.sum(1) <= getattr(rule, "k", 8)).all()
    if getattr(rule, "n_group", 1) > 1:  # at most topk_group groups per token
        groups = r.mask.view(40, rule.n_group, -1).any(-1).sum(1)
        assert (groups <= rule.topk_group).all()


def test_the_bias_is_state_and_frozen_unless_asked():
    rule = ScoreTopK(score="sigmoid", selection_bias=True)
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=rule))
    assert [n for n, _ in moe.named_buffers()] == ["router_state.bias"]
    assert not any("bias" in n for n, _ in moe.named_parameters())
    stats = moe(rand(16, 8)).stats
    moe.update_router_state(stats)
    assert moe.router_state.bias.abs().sum() == 0  # bias_rate 0: as Hugging Face, frozen
    moe.replace_config(router=ScoreTopK(score="sigmoid", selection_bias=True, bias_rate=0.1))
    moe.update_router_state(stats)
    assert moe.router_state.bias.abs().sum() > 0


def test_hash_routing_through_the_layer_and_the_model():
    rule = HashTopK(k=2, vocab_size=16)
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=rule))
    ids = torch.tensor([[3, 3, 5]])
    r = moe(rand(1, 3, 8), token_ids=ids).routing
    assert torch.equal(r.mask[0], r.mask[1])  # the same token id, the same experts
    table = moe.router_state.table
    assert (table.sort(1).values.diff(dim=1) > 0).all()  # k distinct experts per token id
    model = TinyTransformer(ModelConfig(vocab_size=16, moe=moe.config))
    out = model(torch.randint(0, 16, (2, 6)))
    assert all(m.routing.mask.sum(1).eq(2).all() for m in out.layers)


def test_refusals_name_the_field():
    with pytest.raises(ValueError, match="weight='softmax'.*score='logits'"):
        ScoreTopK(weight="softmax")
    with pytest.raises(ValueError, match="bias_rate"):
        ScoreTopK(bias_rate=0.1)
    with pytest.raises(ValueError, match="group_score"):
        ScoreTopK(group_score="mean")
    with pytest.raises(ValueError, match="n_group=3"):
        MoEConfig(num_experts=8, router=ScoreTopK(n_group=3))
    with pytest.raises(ValueError, match="normalize"):
        CapacityTopK(normalize="later")
    with pytest.raises(ValueError, match="input_jitter"):
        SparseMixer(input_jitter=-0.1)
    with pytest.raises(TypeError, match="sample_in_training"):
        SparseMixer(sample_in_training="yes")
    with pytest.raises(ValueError, match="input_jitter=-0.1"):
        TopK(input_jitter=-0.1)
    with pytest.raises(TypeError, match="jitter_experts='no'"):
        ScoreTopK(input_jitter=0.1, jitter_experts="no")
    with pytest.raises(ValueError, match="jitter_draws=0"):
        SparseMixer(input_jitter=0.1, jitter_draws=0)
    with pytest.raises(ValueError, match="norm_p"):
        score_top_k(rand(4, 8), 2, norm_p=0.0)
    with pytest.raises(ValueError, match="n_group=3"):
        score_top_k(rand(4, 8), 2, n_group=3, topk_group=1)
    with pytest.raises(ValueError, match="seq_len=3"):
        capacity_top_k(rand(8, 4), 1, 2, seq_len=3)
    with pytest.raises(ValueError, match="token_ids"):
        MoE(MoEConfig(d_model=8, num_experts=4, router=HashTopK()))(rand(3, 8))
    with pytest.raises(ValueError, match="experts must have shape"):
        hash_top_k(rand(3, 4), torch.zeros(2, 2, dtype=torch.long))


def test_the_zoo_specs_are_registered_and_round_trip():
    for spec in [*RULES, HashTopK(k=3, vocab_size=50, seed=2)]:
        assert routing.router_from_dict(routing.router_to_dict(spec)) == spec
    config = MoEConfig(
        router=ScoreTopK(score="sigmoid", selection_bias=True, n_group=4, topk_group=2)
    )
    assert MoEConfig.from_dict(config.to_dict()) == config


def test_null_and_identity_experts_compete_and_drop_out():
    # columns: 2 true experts, 1 null, 1 identity; softmax over all four, top-2, no renorm
    logits = torch.tensor([[0.0, -9.0, 1.0, 2.0], [3.0, 2.0, -9.0, -9.0]])
    r = score_top_k(logits, 2, renormalize=False, null_experts=1, identity_experts=1)
    p = logits.softmax(-1)
    assert r.mask.tolist() == [[False, False], [True, True]]  # token 0 chose null + identity
    torch.testing.assert_close(r.identity, torch.stack([p[0, 3], torch.tensor(0.0)]))
    torch.testing.assert_close(r.weights[1], p[1, :2])
    assert r.probs.shape == (2, 2) and torch.allclose(r.probs.sum(1), torch.ones(2))


def test_adamoe_renormalizes_over_the_chosen_true_experts_only():
    # 2 true experts, 2 null; top-3 of 4. Token 0 picks both true + a null, tokens 1 and 2 one
    # true + both nulls. AdaMoE's code divides the true experts' weights by their own sum
    logits = torch.tensor([[2.0, 1.0, 0.5, -9.0], [3.0, -9.0, 1.0, 0.0], [-9.0, -8.0, 1.0, 2.0]])
    p = logits.softmax(-1)
    r = score_top_k(logits, 3, null_experts=2, renormalize_over="true")
    assert r.mask.tolist() == [[True, True], [True, False], [False, True]]
    torch.testing.assert_close(r.weights[0], p[0, :2] / p[0, :2].sum())
    torch.testing.assert_close(r.weights[1], torch.tensor([1.0, 0.0]))  # one true expert: all of it
    torch.testing.assert_close(r.weights[2], torch.tensor([0.0, 1.0]))
    chosen = score_top_k(logits, 3, null_experts=2)  # the default: over every chosen column
    torch.testing.assert_close(chosen.weights[1, 0], p[1, 0] / (p[1, 0] + p[1, 2] + p[1, 3]))
    only_null = score_top_k(logits, 2, null_experts=2, renormalize_over="true")
    assert not only_null.mask[2].any() and only_null.weights[2].eq(0).all()  # 0, never NaN


def test_renormalizing_over_the_true_experts_refuses_identity_experts():
    with pytest.raises(ValueError, match="renormalize_over='true' with identity_experts=1"):
        ScoreTopK(k=2, identity_experts=1, renormalize_over="true")
    with pytest.raises(ValueError, match="renormalize_over='true' with identity_experts=2"):
        score_top_k(torch.zeros(1, 4), 2, identity_experts=2, renormalize_over="true")
    with pytest.raises(ValueError, match="renormalize_over"):
        ScoreTopK(k=2, null_experts=1, renormalize_over="free")


def test_the_layer_adds_the_identity_experts_weight_times_x():
    rule = ScoreTopK(k=2, identity_experts=2, renormalize=False)
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=rule))
    assert moe.gate_extra.weight.shape == (2, 8)  # the identity experts' router rows
    with torch.no_grad():
        moe.gate_extra.weight.copy_(rand(2, 8))
    x = rand(16, 8, seed=2)
    out = moe(x)
    assert out.routing.identity.gt(0).any()
    without = out.output - out.routing.identity[:, None] * x
    dense = sum(out.routing.weights[:, e, None] * moe.experts.expert(e, x) for e in range(4))
    torch.testing.assert_close(without, dense, atol=1e-6, rtol=1e-5)
    plain = score_top_k(rand(16, 4), 2)  # a routing without identity experts
    both = type(out.routing).cat([out.routing, plain])
    assert both.identity.shape == (32,) and both.identity[16:].eq(0).all()


def test_adamoes_balance_loss_counts_the_null_experts(randn):
    logits = randn(64, 12, scale=2.0)  # 8 true experts, then 4 null ones
    plain = routing.score_top_k(logits, k=2, null_experts=4)
    full = routing.score_top_k(logits, k=2, null_experts=4, balance_all=True)
    assert plain.balance_probs is None and plain.balance_mask is None
    assert torch.equal(full.mask, plain.mask) and torch.equal(full.weights, plain.weights)
    every = torch.zeros(64, 12, dtype=torch.bool).scatter(1, logits.topk(2, dim=1).indices, True)
    torch.testing.assert_close(full.balance_probs, logits.softmax(dim=1))
    assert torch.equal(full.balance_mask, every), "the null experts' choices are counted"

    from minimoe.losses import load_balance_loss

    x = randn(64, 16, seed=1)
    for free in (False, True):
        layer = MoE(MoEConfig(d_model=16, d_hidden=8, num_experts=8,
                              router=ScoreTopK(k=2, null_experts=4, balance_free=free)))  # fmt: skip
        with torch.no_grad():
            layer.gate_extra.weight.normal_(generator=torch.Generator().manual_seed(2))
            out = layer(x)
            all_logits = layer.router_logits(x)  # (64, 12)
        if free:  # E + n columns: AdaMoE's loss
            chosen = torch.zeros(64, 12, dtype=torch.bool)
            chosen.scatter_(1, all_logits.topk(2, dim=1).indices, True)
            expected = load_balance_loss(all_logits.softmax(dim=1), chosen, count="first")
        else:  # the true experts only
            expected = load_balance_loss(out.routing.probs, out.routing.mask, count="first")
        torch.testing.assert_close(out.losses["load_balance"], expected)
    with pytest.raises(TypeError, match="balance_free"):
        ScoreTopK(balance_free="yes")


@settings(max_examples=25, deadline=None)
@given(
    st.integers(2, 8),  # E true experts
    st.integers(1, 8),  # m free experts
    st.sampled_from(["null", "identity", "constant"]),
    st.integers(0, 10_000),
    st.data(),
)
def test_free_experts_never_reach_the_expert_kernel(E, m, kind, seed, data):
    # the experts' kernel gets exactly the (token, true expert) pairs: a free column is a router
    # output, never a row of FFN work. Null and identity experts cost no expert FLOPs; the
    # constant experts about 6 c d per token (all c at once, in two small matmuls), not an FFN's
    k = data.draw(st.integers(1, E + m))
    torch.manual_seed(seed)
    rule = ScoreTopK(k=k, **{f"{kind}_experts": m})
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=E, router=rule))
    with torch.no_grad():
        moe.gate_extra.weight.normal_(0, 1.0)  # free columns that compete for the top k
    rows, constant_rows = [], []
    grouped = moe.experts.grouped

    def counting(x, counts):
        rows.append(int(sum(counts)))
        return grouped(x, counts)

    moe.experts.grouped = counting
    if moe.constants is not None:
        run_constants = moe.constants.forward

        def counting_constants(x, weights):
            constant_rows.append(int((weights != 0).sum()))
            return run_constants(x, weights)

        moe.constants.forward = counting_constants
    out = moe(torch.randn(32, 8))
    pairs = int(out.routing.mask.sum())
    assert out.routing.mask.shape == (32, E)
    assert sum(rows) == pairs <= 32 * min(k, E)
    free_pairs = 0
    if kind == "constant":
        free_pairs = int(out.routing.constant.ne(0).sum())
        assert constant_rows == [free_pairs] and pairs + free_pairs == 32 * k
        assert moe.constants.flops_per_token() == 6 * m * 8 + 2 * 8  # 6 c d + 2 d, d = 8
    constant_flops = 32 * (6 * m * 8 + 2 * 8) if kind == "constant" else 0
    flops = pairs * moe.experts.flops_per_assignment() + constant_flops
    assert out.stats.flops.item() == flops


# ---- MoE++'s zero-computation experts ---------------------------------------------------------


def test_a_constant_expert_by_hand():
    from minimoe.experts import ConstantExperts

    experts = ConstantExperts(num_experts=2, d_model=2)
    with torch.no_grad():
        experts.vector.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        experts.mix.zero_()
        experts.mix[0, 0, 0] = 1.0  # W_0 x = [x_0, 0]
    x = torch.tensor([[math.log(3.0), 2.0], [5.0, 5.0]])
    g = torch.tensor([[0.5, 0.0], [0.0, 0.0]])  # token 0 chose constant expert 0; token 1 none
    # softmax([ln 3, 0]) = [3/4, 1/4]: E_0(x) = 3/4 x + 1/4 v_0, weighted by 0.5
    expected = 0.5 * (0.75 * x[0] + 0.25 * torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(experts(x, g), torch.stack([expected, torch.zeros(2)]))
    g[0, 1] = 1.0  # expert 1 (W = 0, v = 0): half the token
    torch.testing.assert_close(experts(x, g)[0], expected + 0.5 * x[0])


def test_moepp_rule_by_hand():
    # columns: 2 true experts, then a null (zero), an identity (copy) and a constant expert
    logits = torch.tensor([[3.0, 0.0, 2.0, -9.0, -9.0], [-9.0, -9.0, 0.0, 2.0, 1.0]])
    p = logits.softmax(-1)
    free = {"null_experts": 1, "identity_experts": 1, "constant_experts": 1}
    r = score_top_k(logits, 2, renormalize_over="non_null", **free)
    assert r.mask.tolist() == [[True, False], [False, False]]
    # token 0 chose true expert 0 and the zero expert: the zero expert's weight leaves the sum
    torch.testing.assert_close(r.weights[0], torch.tensor([1.0, 0.0]))
    # token 1 chose the copy and the constant expert, renormalized over the two
    torch.testing.assert_close(
        r.identity, torch.stack([torch.tensor(0.0), p[1, 3] / (p[1, 3] + p[1, 4])])
    )
    torch.testing.assert_close(
        r.constant[:, 0], torch.stack([torch.tensor(0.0), p[1, 4] / (p[1, 3] + p[1, 4])])
    )
    chosen = score_top_k(logits, 2, **free)  # over every chosen column: the zero expert takes some
    torch.testing.assert_close(chosen.weights[0, 0], p[0, 0] / (p[0, 0] + p[0, 2]))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(1, 4), st.integers(0, 10_000))
def test_non_null_renormalization_is_the_released_moepp_gating(E, constants, seed):
    """MoE++'s released gating (SkyworkAI/MoE-plus-plus, ``gating``), written out: columns FFN,
    constant, copy, zero; softmax, top-2, the zero expert's gate set to 0, the rest divided by
    their sum. Ours orders the columns true, null, identity, constant: the same weights."""
    theirs = torch.randn(64, E + constants + 2, generator=torch.Generator().manual_seed(seed))
    gates, idx = theirs.softmax(-1).topk(2, dim=1)
    gates = torch.where(idx == theirs.shape[1] - 1, 0.0, gates)
    gates = gates / gates.sum(1, keepdim=True)
    dense = torch.zeros_like(theirs).scatter(1, idx, gates)  # (T, C) their weight per column
    const = slice(E, E + constants)
    order = [*range(E), E + constants + 1, E + constants, *range(E, E + constants)]
    r = score_top_k(theirs[:, order], 2, null_experts=1, identity_experts=1,
                    constant_experts=constants, renormalize_over="non_null")  # fmt: skip
    torch.testing.assert_close(r.weights, dense[:, :E])
    torch.testing.assert_close(r.identity, dense[:, E + constants])
    torch.testing.assert_close(r.constant, dense[:, const])


def test_the_layer_runs_constant_experts_and_counts_their_flops():
    rule = ScoreTopK(k=2, constant_experts=2, identity_experts=1, renormalize_over="non_null")
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=rule))
    assert moe.gate_extra.weight.shape == (3, 8) and moe.constants.vector.shape == (2, 8)
    assert {"constants.vector", "constants.mix"} <= {n for n, _ in moe.named_parameters()}
    with torch.no_grad():
        moe.gate_extra.weight.copy_(rand(3, 8, seed=1))
    x = rand(32, 8, seed=2)
    out = moe(x)
    r = out.routing
    assert r.constant.ne(0).any() and r.mask.any()
    dense = sum(r.weights[:, e, None] * moe.experts.expert(e, x) for e in range(4))
    expected = dense + r.identity[:, None] * x + moe.constants(x, r.constant)
    torch.testing.assert_close(out.output, expected, atol=1e-6, rtol=1e-5)
    pairs = int(r.mask.sum())
    assert out.stats.flops.item() == (
        pairs * moe.experts.flops_per_assignment() + 32 * (6 * 2 * 8 + 2 * 8)
    )
    out.output.pow(2).sum().backward()
    assert moe.constants.vector.grad.abs().sum() > 0 and moe.constants.mix.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="constant_experts of a built layer"):
        moe.replace_config(router=ScoreTopK(k=2, constant_experts=3))
    same = type(r).cat([r, score_top_k(rand(5, 4), 2)])  # a routing without constant experts
    assert same.constant.shape == (37, 2) and same.constant[32:].eq(0).all()


def test_moepp_heterogeneous_balance_loss(randn):
    from minimoe.losses import load_balance_loss

    # 2 tokens, 3 columns (2 true, 1 free), counting the selected: f = [1/2, 1/2, 1], Q below
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.4, 0.5]])
    mask = torch.tensor([[True, False, True], [False, True, True]])
    eta = torch.tensor([1.0, 1.0, 0.25])
    q = probs.mean(0)  # [0.3, 0.3, 0.4]
    expected = 3 * (0.5 * q[0] + 0.5 * q[1] + 0.25 * 1.0 * q[2])
    got = load_balance_loss(probs, mask, count="selected", weights=eta)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="weights must be a tensor of shape"):
        load_balance_loss(probs, mask, count="selected", weights=torch.ones(2))

    rule = ScoreTopK(k=2, null_experts=2, balance_free=True, free_balance_weight=0.75,
                     balance_count="selected")  # fmt: skip
    assert rule.balance_weights(4).tolist() == [1.0] * 4 + [0.75] * 2
    assert ScoreTopK(k=2, null_experts=2, balance_free=True).balance_weights(4) is None
    layer = MoE(MoEConfig(d_model=16, d_hidden=8, num_experts=4, router=rule))
    with torch.no_grad():
        layer.gate_extra.weight.normal_(generator=torch.Generator().manual_seed(3))
        out = layer(randn(64, 16))
        r = out.routing
    expected = load_balance_loss(r.balance_probs, r.balance_mask, "selected",
                                 weights=rule.balance_weights(4))  # fmt: skip
    torch.testing.assert_close(out.losses["load_balance"], expected)
    plain = load_balance_loss(r.balance_probs, r.balance_mask, "selected")
    assert not torch.isclose(out.losses["load_balance"], plain)


def test_free_expert_settings_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="renormalize_over='true' with constant_experts=1"):
        ScoreTopK(k=2, constant_experts=1, renormalize_over="true")
    with pytest.raises(ValueError, match="renormalize_over='true' with constant_experts=2"):
        score_top_k(rand(3, 6), 2, constant_experts=2, renormalize_over="true")
    with pytest.raises(ValueError, match="constant_experts must be an int"):
        ScoreTopK(constant_experts=-1)
    with pytest.raises(ValueError, match="free_balance_weight=0.75 .* balance_free=True"):
        ScoreTopK(null_experts=1, free_balance_weight=0.75)
    with pytest.raises(ValueError, match="free_balance_weight"):
        ScoreTopK(null_experts=1, balance_free=True, free_balance_weight=0.0)
    with pytest.raises(ValueError, match="n_group=2: groups of free"):
        ScoreTopK(n_group=2, constant_experts=1)
    target = {"identity_experts": 2, "selection_bias": True, "bias_rate": 0.1}
    with pytest.raises(ValueError, match=r"experts_per_token=1.0 .* needs free experts"):
        ScoreTopK(k=2, selection_bias=True, bias_rate=0.1, experts_per_token=1.0)
    with pytest.raises(ValueError, match=r"experts_per_token=1.0 .* bias_rate > 0"):
        ScoreTopK(k=2, identity_experts=2, selection_bias=True, experts_per_token=1.0)
    with pytest.raises(ValueError, match="experts_per_token must be .* got experts_per_token=3.0"):
        ScoreTopK(k=2, experts_per_token=3.0, **target)  # more than k
    with pytest.raises(ValueError, match=r"in \[1, 3\], got experts_per_token=0.5"):
        ScoreTopK(k=3, experts_per_token=0.5, **target)  # 3 - 2 = 1 true expert at least
    with pytest.raises(ValueError, match="experts_per_token=1.5"):
        MoEConfig(num_experts=1, router=ScoreTopK(k=2, experts_per_token=1.5, **target))


def test_free_expert_specs_round_trip():
    for spec in (
        ScoreTopK(k=3, null_experts=1, identity_experts=1, constant_experts=2,
                  renormalize_over="non_null", balance_free=True, free_balance_weight=0.75),
        ScoreTopK(k=4, identity_experts=8, selection_bias=True, bias_rate=0.01,
                  experts_per_token=2.0, renormalize=False),
    ):  # fmt: skip
        assert routing.router_from_dict(routing.router_to_dict(spec)) == spec


# ---- LongCat-Flash's compute target ------------------------------------------------------------


def test_compute_target_update_by_hand():
    from minimoe.routing.production import compute_target_update

    # 2 true experts, 2 free columns; k = 2 of 4 tokens, K_e = 1: each true expert's share
    # should be K_e / (k E) = 1/4 of the 8 selections. Expert 0 got 3 tokens (3/8), expert 1 one
    bias = torch.zeros(4)
    compute_target_update(bias, torch.tensor([3, 1]), torch.tensor(4), k=2, target=1.0, rate=0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.0125, 0.0125, 0.0, 0.0]))
    compute_target_update(bias, torch.tensor([0, 0]), torch.tensor(0), k=2, target=1.0, rate=0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.0125, 0.0125, 0.0, 0.0]))  # no tokens

    spec = ScoreTopK(k=2, identity_experts=2, selection_bias=True, bias_rate=0.1,
                     experts_per_token=1.0, renormalize=False)  # fmt: skip
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=2, router=spec))
    out = moe(rand(4, 8))
    load, T = out.stats.tokens_per_expert, out.stats.num_tokens
    assert T.item() == 4
    moe.update_router_state(out.stats)
    expected = torch.zeros(4)
    expected[:2] = 0.1 * (1.0 / 4 - load / (2 * 4))
    torch.testing.assert_close(moe.router_state.bias, expected)


def test_the_compute_target_bias_is_longcats_hugging_face_rule():
    """With the bias it has, LongCat-Flash's router (Hugging Face ``LongcatFlashTopkRouter``):
    softmax over E + Z columns, top-k of scores + bias, weights the scores times the routed
    scaling factor, not renormalized; the identity experts' weight times x."""
    logits, bias = rand(16, 6), rand(6, seed=1) * 0.1
    spec = ScoreTopK(k=3, identity_experts=2, selection_bias=True, bias_rate=0.01,
                     experts_per_token=1.5, renormalize=False, scaling=6.0)  # fmt: skip
    r = spec(logits, training=True, state={"bias": bias})
    scores = logits.softmax(-1)
    idx = (scores + bias).topk(3, dim=1).indices
    dense = torch.zeros_like(scores).scatter(1, idx, scores.gather(1, idx) * 6.0)
    torch.testing.assert_close(r.weights, dense[:, :4])
    torch.testing.assert_close(r.identity, dense[:, 4:].sum(1))


@settings(max_examples=25, deadline=None)
@given(
    st.integers(2, 8),  # E true experts
    st.integers(1, 8),  # m identity experts
    st.integers(0, 10_000),
    st.data(),
)
def test_the_compute_target_moves_true_experts_per_token_to_the_target(E, m, seed, data):
    """On a fixed input, updates of the bias alone bring the mean true experts per token from
    where top-k puts it to the target: over the last 50 of 300 updates its mean is within
    0.05 + a tenth of the first distance of K_e (the bias integrates the error, so the mean
    settles even where single steps jump a token across the boundary)."""
    k = data.draw(st.integers(1, E + m))
    target = data.draw(st.floats(max(0.25, k - m), min(k, E)))  # k - m: a token's fewest
    spec = ScoreTopK(k=k, identity_experts=m, selection_bias=True, bias_rate=0.5,
                     experts_per_token=target, renormalize=False)  # fmt: skip
    logits = 2 * torch.randn(256, E + m, generator=torch.Generator().manual_seed(seed))
    state = spec.init_state(E)
    per_step = []
    for _ in range(300):
        r = spec(logits, training=True, state=state)
        per_step.append(r.mask.sum(1).float().mean().item())
        spec.update_state(state, stats_of(r, 256))
    first, settled = per_step[0], sum(per_step[-50:]) / 50
    assert abs(settled - target) <= 0.05 + 0.1 * abs(first - target), (first, settled, target)
    assert state["bias"][E:].eq(0).all()  # the free experts' bias never moves


def stats_of(r, T):
    from minimoe.layer import MoEStats

    counts = dict.fromkeys(MoEStats._fields, torch.zeros(()))
    return MoEStats(**counts | {"tokens_per_expert": r.mask.sum(0), "num_tokens": torch.tensor(T)})


def test_the_compute_target_bias_moves_only_after_optimizer_steps():
    from minimoe.routing.production import compute_target_update
    from minimoe.train import TrainConfig, train

    spec = ScoreTopK(k=2, identity_experts=2, selection_bias=True, bias_rate=0.1,
                     experts_per_token=1.0, renormalize=False)  # fmt: skip
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_hidden=16, num_experts=4, router=spec)
    lm = TinyTransformer(ModelConfig(vocab_size=16, block_size=8, n_layers=1, moe=moe))
    idx = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    seen = []
    train(lm, lambda g: {"idx": idx, "targets": idx}, TrainConfig(steps=3, progress=False),
          callback=lambda step, m, out: seen.append(out.layers[0].stats))  # fmt: skip
    expected = torch.zeros(6)
    for stats in seen:
        compute_target_update(expected, stats.tokens_per_expert, stats.num_tokens, 2, 1.0, 0.1)
    bias = lm.blocks[0].ffn.router_state.bias
    torch.testing.assert_close(bias, expected)
    assert expected.abs().sum() > 0
    lm(idx)  # a training-mode forward changes nothing
    torch.testing.assert_close(bias, expected)

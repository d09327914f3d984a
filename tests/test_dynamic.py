"""Compute on demand (minimoe/routing/dynamic.py): ReMoE, expert threshold routing and SeqTopK
against hand-worked values, their state updates, and their properties."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe import routing
from minimoe.layer import MoE, MoEConfig, MoEStats
from minimoe.model import ModelConfig, TinyTransformer
from minimoe.routing import (
    ExpertThreshold,
    ReMoE,
    SeqTopK,
    TopK,
    expert_cutoff,
    expert_threshold,
    relu_l1_loss,
    relu_routing,
    seq_top_k,
    top_k,
)
from minimoe.train import TrainConfig, train


def stats_with(**values) -> MoEStats:
    counts = dict.fromkeys(MoEStats._fields, torch.zeros(()))
    return MoEStats(**counts | {k: torch.as_tensor(v) for k, v in values.items()})


def tiny_lm(router, seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=16, d_hidden=16, num_experts=4, router=router)
    return TinyTransformer(ModelConfig(vocab_size=16, block_size=8, n_layers=1, moe=moe))


IDX = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))


# ---- ReMoE ---------------------------------------------------------------------------------


def test_relu_routing_by_hand():
    logits = torch.tensor([[1.0, -0.5, 0.3, 0.0], [-1.0, -2.0, -0.1, -3.0]])
    r = relu_routing(logits)
    # a gate of exactly 0 sends nothing; the second token clears no expert at all
    assert r.mask.tolist() == [[True, False, True, False], [False, False, False, False]]
    torch.testing.assert_close(r.weights, torch.tensor([[1.0, 0, 0.3, 0], [0, 0, 0, 0]]))
    torch.testing.assert_close(r.probs, logits.softmax(dim=-1))


def test_relu_l1_loss_by_hand():
    gates = torch.tensor([[1.0, 0, 0.3, 0], [0, 0, 0.6, 0]])
    mask = gates > 0
    # mean gates (0.5, 0, 0.45, 0); k=1, T=2, E=4: f = 4 / 2 * (1, 0, 2, 0) = (2, 0, 4, 0)
    torch.testing.assert_close(relu_l1_loss(gates, mask, 1.0), torch.tensor(2 * 0.5 + 4 * 0.45))
    torch.testing.assert_close(relu_l1_loss(gates, mask), torch.tensor(0.5 + 0.45))  # plain L1


def test_the_l1_penalty_reaches_the_aux_loss_with_the_state_coefficient():
    torch.manual_seed(0)
    config = MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=ReMoE(l1_init=0.5))
    moe = MoE(config.with_paper_losses())  # no balance loss, no z-loss: lambda * L_reg alone
    x = torch.randn(2, 8, 8)
    out = moe(x)
    l1 = relu_l1_loss(out.routing.weights, out.routing.mask, 2.0)
    torch.testing.assert_close(out.losses["l1_reg"], l1)
    torch.testing.assert_close(out.aux_loss, 0.5 * l1)
    moe.router_state.l1_coef.fill_(2.0)  # the coefficient is read from the state
    again = moe(x)
    torch.testing.assert_close(again.aux_loss, 2.0 * l1)
    again.aux_loss.backward()  # the gates get the penalty's gradient
    assert moe.gate.weight.grad.abs().sum() > 0


def test_routers_without_a_loss_of_their_own_report_the_same_losses():
    out = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4))(torch.randn(2, 8, 8))
    assert sorted(out.losses) == ["dynamic", "load_balance", "sequence_balance", "z_loss"]


def test_lambda_update_by_hand():
    spec, state = ReMoE(experts_per_token=2.0), {"l1_coef": torch.tensor(1e-8)}
    spec.update_state(state, stats_with(experts_per_token=2.5))  # denser than k: sparsity low
    torch.testing.assert_close(state["l1_coef"], torch.tensor(1.2e-8))
    spec.update_state(state, stats_with(experts_per_token=1.5))  # sparser: lambda shrinks
    torch.testing.assert_close(state["l1_coef"], torch.tensor(1e-8))
    spec.update_state(state, stats_with(experts_per_token=2.0))  # at the target: the code divides
    torch.testing.assert_close(state["l1_coef"], torch.tensor(1e-8 / 1.2))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 16),
    st.floats(0.05, 1.0),
    st.floats(0.0, 1.0),
    st.floats(1.0, 3.0),
    st.floats(-20, 5),
)
def test_lambda_moves_toward_the_target_sparsity(E, k_share, n_share, alpha, log_coef):
    """Sparsity below the target 1 - k/E: lambda grows by alpha; at or above it: it shrinks."""
    k, n = k_share * E, n_share * E
    spec = ReMoE(experts_per_token=k, l1_multiplier=alpha)
    before = torch.tensor(10.0**log_coef)
    state = {"l1_coef": before.clone()}
    spec.update_state(state, stats_with(experts_per_token=torch.tensor(n)))
    sparsity, target = 1 - torch.tensor(n) / E, 1 - k / E
    ratio = (state["l1_coef"] / before).item()
    if n > k:  # (in float32: 1 - n/E < 1 - k/E exactly when n > k, up to rounding)
        assert sparsity <= target + 1e-6 and ratio == pytest.approx(alpha, rel=1e-5)
    else:
        assert ratio == pytest.approx(1 / alpha, rel=1e-5)


def test_lambda_never_underflows_so_it_can_come_back():
    spec, state = ReMoE(), {"l1_coef": torch.tensor(1e-8)}
    for _ in range(600):  # sparser than the target for long: 1.2^-600 would underflow to 0
        spec.update_state(state, stats_with(experts_per_token=0.0))
    assert state["l1_coef"] > 0
    spec.update_state(state, stats_with(experts_per_token=4.0))
    assert state["l1_coef"] > torch.finfo(torch.float32).tiny


def test_lambda_moves_only_after_optimizer_steps():
    lm = tiny_lm(ReMoE(experts_per_token=1.0, l1_init=1e-3))
    seen = []
    history = train(
        lm,
        lambda g: {"idx": IDX, "targets": IDX},
        TrainConfig(steps=4, progress=False),
        callback=lambda step, m, out: seen.append(out.layers[0].stats.experts_per_token),
    )
    assert all(math.isfinite(x) for x in history.loss)
    expected = 1e-3
    for n in seen:
        expected *= 1.2 if n > 1.0 else 1 / 1.2
    coef = lm.blocks[0].ffn.router_state.l1_coef
    assert coef.item() == pytest.approx(expected, rel=1e-5)
    lm(IDX)  # a training-mode forward (a cell run again) changes nothing
    lm.eval()
    with torch.no_grad():
        lm(IDX)
    assert coef.item() == pytest.approx(expected, rel=1e-5)
    assert "ffn.router_state.l1_coef" in "".join(lm.blocks[0].state_dict())


def test_the_adaptive_penalty_brings_a_dense_router_down_to_its_target():
    """A router that starts with every gate open: lambda grows until the L1 pull closes gates."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=ReMoE(experts_per_token=1.0)))
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, 0] = 1.0  # every logit is x_0: every gate open where x_0 > 0
    x = torch.randn(256, 8).abs()  # every gate open at first: 4 experts per token
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    first = None
    for _ in range(200):
        out = moe(x)
        first = out.stats.experts_per_token.item() if first is None else first
        opt.zero_grad()
        out.losses["l1_reg"].mul(moe.router_state.l1_coef).backward()
        opt.step()
        moe.update_router_state(out.stats)
        if out.stats.experts_per_token <= 1.0:
            break
    assert first == 4.0 and out.stats.experts_per_token <= 1.0


# ---- expert threshold routing --------------------------------------------------------------


def test_expert_threshold_by_hand():
    logits = torch.tensor([[1.0, -0.5, 0.2], [0.0, 0.5, -1.0], [-1.0, -1.0, -1.0]])
    c = torch.tensor([0.5, 0.0, 0.2])
    r = expert_threshold(logits, c)
    # a score equal to its threshold clears it; the last token clears none
    assert r.mask.tolist() == [[True, False, True], [False, True, False], [False, False, False]]
    s = torch.sigmoid(logits)
    torch.testing.assert_close(r.weights, s * r.mask)  # sigmoid scores, not renormalized
    renormalized = expert_threshold(logits, c, renormalize=True).weights
    torch.testing.assert_close(renormalized[0], s[0] * r.mask[0] / (s[0, 0] + s[0, 2]))
    assert renormalized[2].abs().sum() == 0  # no expert: no weight, no 0 / 0


def test_expert_cutoff_by_hand():
    logits = torch.tensor([[3.0, 0.0], [1.0, 5.0], [2.0, 1.0], [0.0, 4.0]])
    cutoff = expert_cutoff(logits, 1.0)  # k/E = 1/2 of 4 tokens: C = 2, the 2nd largest
    assert cutoff.tolist() == [2.0, 4.0]
    assert expert_threshold(logits, cutoff).tokens_per_expert.tolist() == [2, 2]
    assert torch.isnan(expert_cutoff(logits[:0], 1.0)).all()  # no tokens: nothing measured


def test_threshold_update_by_hand():
    spec = ExpertThreshold(ema_decay=0.9)  # the measure is the step's logits, (T, E)
    state = spec.init_state(2)
    # k/E = 1 of 2 tokens: the cutoff is each column's 2nd largest, [2, 4]; the first is taken
    spec.update_state(state, stats_with(router_measure=[[2.0, 4.0], [3.0, 6.0]]))
    torch.testing.assert_close(state["threshold"], torch.tensor([2.0, 4.0]))
    spec.update_state(state, stats_with(router_measure=[[0.0, 0.0]]))  # c = 0.9 c + 0.1 cutoff
    torch.testing.assert_close(state["threshold"], torch.tensor([1.8, 3.6]))
    spec.update_state(state, stats_with(router_measure=torch.zeros(0, 2)))  # no tokens
    torch.testing.assert_close(state["threshold"], torch.tensor([1.8, 3.6]))
    assert state["updates"].item() == 2


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(2, 6), st.integers(0, 10_000), st.booleans())
def test_threshold_routing_in_evaluation_reads_no_other_token(T, E, seed, warm):
    """In evaluation a token's route is its own: another batch, the same rows."""
    g = torch.Generator().manual_seed(seed)
    logits, more = torch.randn(T, E, generator=g), torch.randn(5, E, generator=g)
    spec = ExpertThreshold(experts_per_token=1.0, warmup_steps=3 if warm else 0)
    state = {"threshold": torch.randn(E, generator=g), "updates": torch.zeros((), dtype=torch.long)}
    alone = spec(logits, training=False, state=state)
    order = torch.randperm(T + 5, generator=g)
    mixed = spec(torch.cat([logits, more])[order], training=False, state=state)
    back = torch.empty_like(order)
    back[order] = torch.arange(T + 5)
    assert torch.equal(mixed.mask[back[:T]], alone.mask)
    torch.testing.assert_close(mixed.weights[back[:T]], alone.weights)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(2, 8), st.floats(0.1, 1.0), st.integers(0, 10_000))
def test_at_the_batch_cutoff_every_expert_gets_its_share(T, E, share, seed):
    """The cutoff the thresholds track fills each expert with C = ceil(k T / E) of the batch."""
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))  # no ties
    k = share * E
    load = expert_threshold(logits, expert_cutoff(logits, k)).tokens_per_expert
    assert load.tolist() == [min(T, max(1, math.ceil(k * T / E)))] * E


def test_warm_up_routes_by_the_batch_cutoff_in_training_only():
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    spec = ExpertThreshold(experts_per_token=1.0, warmup_steps=2)
    state = spec.init_state(4)  # threshold 0
    by_cutoff = expert_threshold(logits, expert_cutoff(logits, 1.0)).mask
    by_state = expert_threshold(logits, state["threshold"]).mask
    assert not torch.equal(by_cutoff, by_state)
    assert torch.equal(spec(logits, training=True, state=state).mask, by_cutoff)
    assert torch.equal(spec(logits, training=False, state=state).mask, by_state)
    state["updates"].fill_(2)  # warmed up
    assert torch.equal(spec(logits, training=True, state=state).mask, by_state)


def test_thresholds_balance_a_skewed_router_without_a_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 8, generator=g) + torch.tensor([2.0, 1, 0, 0, 0, 0, 0, 0])
    spec = ExpertThreshold(experts_per_token=2.0, ema_decay=0.9)
    state = spec.init_state(8)
    before = spec(logits, training=True, state=state).tokens_per_expert
    for _ in range(200):
        r = spec(logits, training=True, state=state)
        spec.update_state(state, stats_with(router_measure=spec.batch_measure(r)))
    after = spec(logits, training=True, state=state).tokens_per_expert
    assert before.max() > 2 * before.min()
    assert (after - 128).abs().max() <= 1  # C = 2 * 512 / 8 = 128 tokens each


def test_thresholds_move_only_after_optimizer_steps():
    lm = tiny_lm(ExpertThreshold(experts_per_token=1.0, ema_decay=0.5))
    cutoffs = []
    history = train(
        lm,
        lambda g: {"idx": IDX, "targets": IDX},
        TrainConfig(steps=3, progress=False),
        callback=lambda step, m, out: cutoffs.append(
            expert_cutoff(out.layers[0].stats.router_measure, 1.0)
        ),
    )
    assert all(math.isfinite(x) for x in history.loss)
    expected = cutoffs[0]
    for cut in cutoffs[1:]:
        expected = 0.5 * expected + 0.5 * cut
    state = lm.blocks[0].ffn.router_state
    torch.testing.assert_close(state.threshold, expected)
    lm(IDX)  # a training-mode forward changes nothing
    lm.eval()
    with torch.no_grad():
        lm(IDX)
    torch.testing.assert_close(state.threshold, expected)
    assert state.updates.item() == 3


def test_a_token_that_clears_no_threshold_is_counted_not_lost():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=ExpertThreshold()))
    moe.router_state.threshold.fill_(1e9)  # nobody clears anything
    x = torch.randn(2, 8, 8)
    out = moe(x)
    assert out.stats.unrouted_tokens == 16 and out.stats.dropped_tokens == 0
    assert out.output.abs().sum() == 0  # no shared expert: the MoE adds nothing for them


# ---- SeqTopK -------------------------------------------------------------------------------


def probs_as_logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows).log()  # softmax(log P) = P for rows summing to 1


def test_seq_top_k_by_hand():
    logits = probs_as_logits([0.5, 0.45, 0.05], [0.4, 0.3, 0.3])
    # k=1, one sequence of 2 tokens: the 2 largest P of all 6 pairs are both token 0's
    r = seq_top_k(logits, k=1)
    assert r.mask.tolist() == [[True, True, False], [False, False, False]]
    torch.testing.assert_close(r.weights[0], torch.tensor([0.5, 0.45, 0]) / 0.95)
    assert r.weights[1].abs().sum() == 0
    # at most U=1 per token: the candidates are each token's best, and each gets it
    capped = seq_top_k(logits, k=1, max_experts=1)
    assert capped.mask.tolist() == [[True, False, False], [True, False, False]]
    assert torch.equal(seq_top_k(logits, k=1, min_experts=1).mask, capped.mask)
    # k=2: 0.5, 0.45, 0.4, then the tie 0.3 / 0.3 of token 1 goes to the lower expert
    assert seq_top_k(logits, k=2).mask.tolist() == [[True, True, False], [True, True, False]]
    # two sequences of one token each: top-1 per token, whatever the other holds
    assert torch.equal(seq_top_k(logits, k=1, seq_len=1).mask, capped.mask)


def test_seq_top_k_is_not_causal_and_top_k_is():
    """Changing the later token alone changes the earlier token's experts."""
    before = probs_as_logits([0.5, 0.45, 0.05], [0.4, 0.3, 0.3])
    after = probs_as_logits([0.5, 0.45, 0.05], [0.9, 0.05, 0.05])
    assert seq_top_k(before, k=1).mask[0].tolist() == [True, True, False]
    assert seq_top_k(after, k=1).mask[0].tolist() == [True, False, False]
    assert torch.equal(top_k(before, k=1).mask[0], top_k(after, k=1).mask[0])


@pytest.mark.parametrize("router", [SeqTopK(experts_per_token=1), TopK(k=1, renormalize=False)])
def test_in_a_causal_model_only_seq_top_k_reads_later_tokens(router):
    lm = tiny_lm(router).eval()
    changed = IDX.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 16  # only the last token of each sequence differs
    with torch.no_grad():
        a, b = lm(IDX), lm(changed)
    first = slice(0, 7)  # positions that cannot see the last token under causal attention
    routes_a = a.layers[0].routing.mask.view(4, 8, 4)[:, first]
    routes_b = b.layers[0].routing.mask.view(4, 8, 4)[:, first]
    assert torch.equal(routes_a, routes_b) == isinstance(router, TopK)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 10),
    st.integers(2, 8),
    st.data(),
    st.integers(0, 10_000),
)
def test_seq_top_k_spends_exactly_its_budget_within_the_caps(B, L, E, data, seed):
    k = data.draw(st.integers(1, E))
    U = data.draw(st.integers(k, E))
    m = data.draw(st.integers(0, k))
    scale = data.draw(st.sampled_from([0.0, 1.0, 5.0]))  # 0: every pair tied
    logits = scale * torch.randn(B * L, E, generator=torch.Generator().manual_seed(seed))
    r = seq_top_k(logits, k=k, seq_len=L, max_experts=U, min_experts=m)
    counts = r.expert_counts.view(B, L)
    assert counts.sum(dim=1).tolist() == [L * k] * B
    assert counts.max() <= U and counts.min() >= m
    assert ((r.weights != 0) <= r.mask).all()
    sums = r.weights.sum(dim=1)
    torch.testing.assert_close(
        sums[counts.view(-1) > 0], torch.ones_like(sums[counts.view(-1) > 0])
    )


def test_seq_top_k_in_a_layer_spends_per_sequence_and_counts_idle_tokens():
    torch.manual_seed(0)
    router = SeqTopK(experts_per_token=1, max_experts=3)
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=router))
    out = moe(torch.randn(3, 8, 8) * torch.linspace(0.1, 3, 8)[:, None])  # some tokens louder
    counts = out.routing.expert_counts.view(3, 8)
    assert counts.sum(dim=1).tolist() == [8, 8, 8] and counts.max() <= 3
    assert out.stats.unrouted_tokens == (counts == 0).sum() > 0
    assert out.stats.experts_per_token == 1.0 and out.stats.dropped_pairs == 0
    history = train(
        tiny_lm(router),
        lambda g: {"idx": IDX, "targets": IDX},
        TrainConfig(steps=3, progress=False),
    )
    assert all(math.isfinite(x) for x in history.loss)


# ---- specs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda: ReMoE(experts_per_token=0), "experts_per_token=0"),
        (lambda: ReMoE(l1_init=0.0), "l1_init=0.0"),
        (lambda: ReMoE(l1_multiplier=0.5), "l1_multiplier=0.5"),
        (lambda: ReMoE(load_balance=1), "load_balance=1"),
        (
            lambda: MoEConfig(num_experts=4, router=ReMoE(experts_per_token=5)),
            "experts_per_token=5",
        ),
        (lambda: ExpertThreshold(experts_per_token=-1), "experts_per_token=-1"),
        (lambda: ExpertThreshold(ema_decay=1.5), "ema_decay=1.5"),
        (lambda: ExpertThreshold(warmup_steps=-1), "warmup_steps=-1"),
        (lambda: ExpertThreshold(renormalize=None), "renormalize=None"),
        (
            lambda: MoEConfig(num_experts=4, router=ExpertThreshold(experts_per_token=4.5)),
            "experts_per_token=4.5",
        ),
        (lambda: SeqTopK(experts_per_token=0), "experts_per_token=0"),
        (lambda: SeqTopK(experts_per_token=2.0), "experts_per_token=2.0"),
        (lambda: SeqTopK(max_experts=1), "max_experts=1"),
        (lambda: SeqTopK(min_experts=3), "min_experts=3"),
        (lambda: MoEConfig(num_experts=4, router=SeqTopK(max_experts=5)), "max_experts=5"),
        (lambda: seq_top_k(torch.zeros(6, 4), seq_len=4), "seq_len=4"),
    ],
)
def test_bad_settings_raise_naming_the_value(make, text):
    with pytest.raises((ValueError, TypeError), match=re.escape(text)):
        make()


@pytest.mark.parametrize(
    "spec",
    [
        ReMoE(),
        ReMoE(experts_per_token=1.5, load_balance=False),
        ExpertThreshold(experts_per_token=1.5, ema_decay=0.9, warmup_steps=10, renormalize=True),
        SeqTopK(experts_per_token=1, max_experts=3, min_experts=1, renormalize=False),
    ],
)
def test_registry_round_trip(spec):
    assert routing.router_from_dict(routing.router_to_dict(spec)) == spec
    config = MoEConfig(router=spec)
    assert MoEConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "router",
    [ReMoE(), ExpertThreshold(experts_per_token=1.0), SeqTopK(experts_per_token=1)],
)
def test_a_token_without_experts_is_counted_and_gets_no_output(router):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=router))
    if isinstance(router, ExpertThreshold):
        moe.router_state.threshold.fill_(0.5)
    out = moe(torch.randn(4, 8, 8))
    idle = ~out.routing.mask.any(dim=1)
    assert idle.any() and out.stats.unrouted_tokens == idle.sum()
    assert out.stats.dropped_pairs == 0 and out.stats.dropped_tokens == 0
    assert out.output.view(-1, 8)[idle].abs().sum() == 0
    assert out.output.view(-1, 8)[~idle].abs().sum(dim=1).min() > 0

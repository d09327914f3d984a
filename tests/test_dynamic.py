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
from minimoe.routing import ReMoE, relu_l1_loss, relu_routing
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
    ],
)
def test_bad_settings_raise_naming_the_value(make, text):
    with pytest.raises((ValueError, TypeError), match=re.escape(text)):
        make()


@pytest.mark.parametrize("spec", [ReMoE(), ReMoE(experts_per_token=1.5, load_balance=False)])
def test_registry_round_trip(spec):
    assert routing.router_from_dict(routing.router_to_dict(spec)) == spec
    config = MoEConfig(router=spec)
    assert MoEConfig.from_dict(config.to_dict()) == config

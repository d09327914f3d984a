"""The MoE layer and its losses against hand-worked values and dense oracles."""

import math
import re

import pytest
import torch

from minimoe.layer import MoE, MoEConfig, fine_grained
from minimoe.losses import (
    accumulated_balance_loss,
    dynamic_loss,
    load_balance_loss,
    sequence_balance_loss,
    z_loss,
)
from minimoe.routing import (
    Adaptive,
    ExpertChoice,
    GWBroadcast,
    NoisyTopK,
    Routing,
    SigmoidTopK,
    TopK,
    TopP,
)

D, H, E = 8, 16, 4


def config(**overrides):
    return MoEConfig(**{"d_model": D, "d_hidden": H, "num_experts": E, **overrides})


def layer(seed=0, **overrides):
    torch.manual_seed(seed)
    return MoE(config(**overrides))


def tokens(*shape, seed=1):
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed))


def router_probs(moe, x):
    """P = softmax(x W_r^T), computed here rather than by the layer."""
    return (x @ moe.gate.weight.detach().T).softmax(dim=-1)  # (T, E)


def mixture(moe, x, weights):
    """Dense oracle: sum_e weights[t, e] * Expert_e(x_t)."""
    return (weights[:, :, None] * moe.experts.dense(x)).sum(dim=1)  # (T, d)


ROUTER_CONFIGS = {
    "top_k": {},
    "switch": {"router": TopK(k=1, renormalize=False)},
    "noisy_top_k": {"router": NoisyTopK()},
    "top_p": {"router": TopP()},
    "adaptive": {"router": Adaptive()},
    "gw": {"router": GWBroadcast(TopK(), threshold=0.5, max_slots=2)},
    "capacity_loop": {"capacity_factor": 1.0, "dispatch": "loop"},
    "shared_expert": {"shared_hidden": 12, "shared_gate": True, "capacity_factor": 1.0},
}


# ---- shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROUTER_CONFIGS)
@pytest.mark.parametrize("shape", [(5,), (2, 3)], ids=["T,d", "B,L,d"])
def test_output_shape_is_input_shape(shape, name):
    x = tokens(*shape)
    out = layer(**ROUTER_CONFIGS[name])(x)
    assert out.output.shape == x.shape
    assert out.routing.mask.shape == (math.prod(shape), E)


@pytest.mark.parametrize("name", ROUTER_CONFIGS)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0)], ids=["0,d", "0,5,d", "3,0,d"])
def test_empty_batch(shape, name):
    x = tokens(*shape)
    out = layer(**ROUTER_CONFIGS[name])(x)
    assert out.output.shape == x.shape
    assert out.aux_loss.item() == 0
    assert all(loss.item() == 0 for loss in out.losses.values())
    assert out.stats.dropped_pairs.item() == 0 and out.stats.flops.item() == 0


# ---- losses ----------------------------------------------------------------------------


def test_load_balance_is_1_at_perfect_balance():
    assert load_balance_loss(torch.full((6, E), 1 / E)).item() == pytest.approx(1)
    one_hot_balanced = torch.eye(E).repeat(2, 1)  # f_i = Q_i = 1/E
    assert load_balance_loss(one_hot_balanced).item() == pytest.approx(1)


def test_load_balance_is_num_experts_at_collapse():
    collapsed = torch.zeros(6, E)
    collapsed[:, 2] = 1
    assert load_balance_loss(collapsed).item() == pytest.approx(E)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_load_balance_selected_grows_with_experts_per_token(k):
    # token t selects experts t, t+1, .., t+k-1 (mod E): f_i = k/E, Q_i = 1/E, L_b = k
    mask = torch.zeros(2 * E, E, dtype=torch.bool)
    for t in range(2 * E):
        mask[t, [(t + j) % E for j in range(k)]] = True
    probs = torch.full((2 * E, E), 1 / E)
    assert load_balance_loss(probs, mask, count="selected").item() == pytest.approx(k)
    assert load_balance_loss(probs, mask, count="first").item() == pytest.approx(1)


# two experts, four tokens: the first two pick expert 0, the last two expert 1, so the batch
# is balanced and each half is one-sided
HALVES = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])


def test_load_balance_over_groups_by_hand():
    # all four: f = (1/2, 1/2), Q = (0.525, 0.475): L_b = 2 (0.2625 + 0.2375) = 1
    assert load_balance_loss(HALVES).item() == pytest.approx(1.0)
    assert load_balance_loss(HALVES, group_size=4).item() == pytest.approx(1.0)
    # per half: f = (1, 0), Q = (0.85, 0.15) -> 1.7; f = (0, 1), Q = (0.2, 0.8) -> 1.6
    assert load_balance_loss(HALVES, group_size=2).item() == pytest.approx(1.65)
    # one token per group: f is its own first choice, Q its own P: 2 * mean of P_max
    assert load_balance_loss(HALVES, group_size=1).item() == pytest.approx(
        2 * (0.9 + 0.8 + 0.7 + 0.9) / 4
    )
    mask = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1]], dtype=torch.bool)
    # selected, per half: f = (1, 1/2), Q = (0.85, 0.15) -> 1.85; f = (0, 1) -> 1.6
    got = load_balance_loss(HALVES, mask, count="selected", group_size=2).item()
    assert got == pytest.approx((1.85 + 1.6) / 2)


def test_load_balance_over_groups_is_the_mean_of_the_groups_alone(randn):
    probs = randn(24, 6).softmax(dim=1)
    mask = torch.zeros(24, 6, dtype=torch.bool).scatter(1, probs.topk(2, dim=1).indices, True)
    for count in ("first", "selected"):
        for n in (1, 3, 8, 24):
            alone = [load_balance_loss(p, m, count) for p, m in zip(probs.split(n), mask.split(n))]
            got = load_balance_loss(probs, mask, count, group_size=n)
            torch.testing.assert_close(got, torch.stack(alone).mean())


def test_load_balance_over_groups_gradient_by_hand():
    probs = HALVES.clone().requires_grad_()
    load_balance_loss(probs, group_size=2).backward()
    # dL/dP_ti = E f_i(group) / (groups * n): 2 * (1, 0) / 4 for the first half
    expected = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.0, 0.5], [0.0, 0.5]])
    torch.testing.assert_close(probs.grad, expected)


def test_accumulated_balance_by_hand():
    # micro-batch 1: the buffer holds its own counts, f = (1, 0), Q = (0.85, 0.15) -> 1.7;
    # micro-batch 2: the buffer holds both, f = (1/2, 1/2), Q = (0.2, 0.8) -> 1.0
    assert accumulated_balance_loss(HALVES, micro_batch=2).item() == pytest.approx(1.35)
    probs = HALVES.clone().requires_grad_()
    accumulated_balance_loss(probs, micro_batch=2).backward()
    # the gradient reaches Q only: E f_i(buffer) / (micro-batches * n)
    expected = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.25, 0.25], [0.25, 0.25]])
    torch.testing.assert_close(probs.grad, expected)


def test_accumulated_balance_between_micro_batch_and_global(randn):
    probs = randn(32, 4).softmax(dim=1)
    mask = torch.zeros(32, 4, dtype=torch.bool).scatter(1, probs.topk(2, dim=1).indices, True)
    for count in ("first", "selected"):
        one = accumulated_balance_loss(probs, mask, count, micro_batch=32)
        torch.testing.assert_close(one, load_balance_loss(probs, mask, count))  # one micro-batch
        first = accumulated_balance_loss(probs[:8], mask[:8], count, micro_batch=8)
        torch.testing.assert_close(first, load_balance_loss(probs[:8], mask[:8], count))


@pytest.mark.parametrize("loss", [load_balance_loss, accumulated_balance_loss])
def test_balance_groups_are_checked(loss):
    name = "group_size" if loss is load_balance_loss else "micro_batch"
    with pytest.raises(
        ValueError, match=f"{name} must be >= 1 and divide the 4 tokens, got {name}=3"
    ):
        loss(HALVES, **{name: 3})
    with pytest.raises(ValueError, match=f"got {name}=0"):
        loss(HALVES, **{name: 0})
    with pytest.raises(TypeError, match=f"{name} must be an int, got {name}=2.0"):
        loss(HALVES, **{name: 2.0})
    with pytest.raises(ValueError, match="count='selected' needs the routing mask"):
        loss(HALVES, None, "selected", 2)
    assert loss(HALVES[:0], None, "first", 2).item() == 0


def test_z_loss_and_dynamic_loss_by_hand():
    # logsumexp(0, 0) = ln 2, logsumexp(ln 3, 0) = ln 4 = 2 ln 2: mean square = 2.5 (ln 2)^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    assert z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-6)
    # entropies ln 2 and 0
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert dynamic_loss(probs).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


@pytest.mark.parametrize(
    "overrides, balance, beta",
    [
        ({}, 1, 0.0),
        ({"dynamic_coef": 1e-4}, 1, 1e-4),
        # top_p at p = 0.4 over P = 1/4 keeps 2 experts; L_b counts the selected set, so
        # L_b = E * sum_i f_i / E = 2; beta defaults to the paper's 1e-4
        ({"router": TopP()}, 2, 1e-4),
    ],
)
def test_layer_aux_loss_by_hand(overrides, balance, beta):
    # a zero router: P uniform, so L_b = 1 (first choices), L_z = (ln E)^2, L_d = ln E
    moe = layer(**overrides)
    torch.nn.init.zeros_(moe.gate.weight)
    out = moe(tokens(6))
    ln_e = math.log(E)
    assert out.losses["load_balance"].item() == pytest.approx(balance, rel=1e-6)
    assert out.losses["z_loss"].item() == pytest.approx(ln_e**2, rel=1e-6)
    assert out.losses["dynamic"].item() == pytest.approx(ln_e, rel=1e-6)
    expected = 1e-2 * balance + 1e-3 * ln_e**2 + beta * ln_e
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_layer_dynamic_loss_is_mean_entropy():
    moe, x = layer(), tokens(10)
    p = router_probs(moe, x)
    assert moe(x).losses["dynamic"].item() == pytest.approx(
        -(p * p.log()).sum(1).mean().item(), rel=1e-5
    )


def test_aux_loss_reaches_the_router():
    moe = layer()
    moe(tokens(10)).aux_loss.backward()
    grad = moe.gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()


# ---- DeepSeek-V3's sequence-wise balance loss ------------------------------------------


def seq_balance_by_hand(p, mask, seq_len, k):
    """The loss with loops: f_i = E / (k L) * #{t in seq : i in S_t}, P_i = mean_t p_ti."""
    num_experts, values = p.shape[1], []
    for start in range(0, p.shape[0], seq_len):
        seq = range(start, start + seq_len)
        experts = range(num_experts)
        f = [num_experts / (k * seq_len) * sum(bool(mask[t, i]) for t in seq) for i in experts]
        P = [sum(p[t, i].item() for t in seq) / seq_len for i in experts]
        values.append(sum(fi * Pi for fi, Pi in zip(f, P)))
    return sum(values) / len(values)


def test_sequence_balance_is_1_at_perfect_balance_whatever_the_probs(randn):
    # two sequences of 4 tokens, token t -> experts t, t+1 (mod 4): each expert is chosen
    # k L / E = 2 times per sequence, so f_i = 1 and L_seq = sum_i P_i = 1
    mask = torch.zeros(8, E, dtype=torch.bool)
    for t in range(8):
        mask[t, [t % E, (t + 1) % E]] = True
    probs = randn(8, E).softmax(dim=-1)
    assert sequence_balance_loss(probs, mask, seq_len=4, k=2).item() == pytest.approx(1)


def test_sequence_balance_by_hand():
    # one sequence, both tokens on expert 0: f = 4 / (1 * 2) * [2, 0, 0, 0] = [4, 0, 0, 0],
    # P_0 = (0.7 + 0.5) / 2 = 0.6, L_seq = 2.4
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]])
    mask = torch.tensor([[True, False, False, False]] * 2)
    assert sequence_balance_loss(probs, mask, seq_len=2, k=1).item() == pytest.approx(2.4)


def test_sequence_balance_sees_imbalance_within_sequences_that_the_batch_hides():
    # sequence 0 sends both tokens to expert 0, sequence 1 both to expert 1 (E = 2, k = 1):
    # per sequence f = [2, 0], P = [0.9, 0.1]: 1.8 each; as one sequence f = [1, 1]: 1.0
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    mask = torch.tensor([[True, False], [True, False], [False, True], [False, True]])
    assert sequence_balance_loss(probs, mask, seq_len=2, k=1).item() == pytest.approx(1.8)
    assert sequence_balance_loss(probs, mask, seq_len=4, k=1).item() == pytest.approx(1.0)


def test_sequence_balance_k_none_is_the_mean_experts_per_token(randn):
    probs = randn(6, E).softmax(dim=-1)
    mask = probs > 0.2  # a varying number of experts per token
    k = mask.sum().item() / 6
    expected = seq_balance_by_hand(probs, mask, 3, k)
    assert sequence_balance_loss(probs, mask, 3, None).item() == pytest.approx(expected, rel=1e-6)
    none = torch.zeros_like(mask)  # no expert at all: f = 0, not 0 / 0
    assert sequence_balance_loss(probs, none, 3, None).item() == 0
    assert (
        sequence_balance_loss(torch.zeros(0, E), torch.zeros(0, E, dtype=torch.bool), 3).item() == 0
    )


@pytest.mark.parametrize(
    "shape, seq_len, k, error, text",
    [
        ((4, E), 3, 1, ValueError, "seq_len=3"),
        ((4, E), 0, 1, ValueError, "seq_len=0"),
        ((4, E), 2.0, 1, TypeError, "seq_len=2.0"),
        ((4, E), 2, 0, ValueError, "k=0"),
        ((4, E), 2, "2", TypeError, "k='2'"),
        ((4, E + 1), 2, 1, ValueError, f"(4, {E + 1}) and (4, {E})"),
    ],
)
def test_sequence_balance_refuses_bad_input(shape, seq_len, k, error, text):
    probs = torch.full(shape, 1 / shape[1])
    with pytest.raises(error, match=re.escape(text)):
        sequence_balance_loss(probs, torch.ones(4, E, dtype=torch.bool), seq_len, k)


@pytest.mark.parametrize("shape, seq_len", [((3, 5), 5), ((7,), 7)], ids=["B,L,d", "T,d"])
def test_layer_sequence_balance_per_sequence_of_the_input(shape, seq_len):
    moe, x = layer(), tokens(*shape)
    p = router_probs(moe, x.reshape(-1, D))
    top2 = torch.zeros_like(p, dtype=torch.bool).scatter(1, p.topk(2, dim=1).indices, True)
    out = moe(x)
    expected = seq_balance_by_hand(p, top2, seq_len, k=2)
    assert out.losses["sequence_balance"].item() == pytest.approx(expected, rel=1e-5)
    # off by default: the aux loss is exactly the other terms
    c = moe.config
    assert torch.equal(
        out.aux_loss, c.balance_coef * out.losses["load_balance"] + c.z_coef * out.losses["z_loss"]
    )


def test_layer_sequence_balance_without_k_uses_the_mean_experts_per_token():
    moe, x = layer(router=TopP(p=0.5)), tokens(2, 6)
    out = moe(x)
    ept = out.stats.experts_per_token.item()
    expected = seq_balance_by_hand(router_probs(moe, x.reshape(-1, D)), out.routing.mask, 6, ept)
    assert out.losses["sequence_balance"].item() == pytest.approx(expected, rel=1e-5)


def test_seq_balance_coef_weighs_the_loss_into_aux():
    x = tokens(2, 6)
    base = layer()(x)
    out = layer(seq_balance_coef=0.5)(x)
    assert out.aux_loss.item() == pytest.approx(
        base.aux_loss.item() + 0.5 * base.losses["sequence_balance"].item(), rel=1e-6
    )
    paper = config(router=SigmoidTopK()).with_paper_losses()  # DeepSeek-V3's recipe
    assert (paper.balance_coef, paper.z_coef, paper.seq_balance_coef) == (0.0, 0.0, 1e-4)
    torch.manual_seed(0)
    moe = MoE(paper)
    out = moe(x)
    assert out.aux_loss.item() == pytest.approx(1e-4 * out.losses["sequence_balance"].item())
    out.aux_loss.backward()  # through P_i, the only gradient path
    assert moe.gate.weight.grad.abs().sum() > 0


# ---- capacity statistics ---------------------------------------------------------------


def forced_layer(**overrides):
    """Every token's logits are [10, 5, 0, 0]: first choice expert 0, second expert 1."""
    moe = layer(**overrides)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, 0] = torch.tensor([10.0, 5.0, 0.0, 0.0])
    x = tokens(8)
    x[:, 0] = 1.0
    return moe, x


@pytest.mark.parametrize(
    "k, capacity_factor, dropped_pairs, dropped_tokens",
    [
        (1, 1.0, 6, 6),  # capacity ceil(8 / 4) = 2 on expert 0
        (1, 2.0, 4, 4),  # capacity 4
        (2, 1.0, 8, 4),  # capacity ceil(16 / 4) = 4 on experts 0 and 1: tokens 4-7 lose both
        (1, None, 0, 0),
        (2, None, 0, 0),
    ],
)
def test_dropped_pairs_for_forced_routing(k, capacity_factor, dropped_pairs, dropped_tokens):
    moe, x = forced_layer(router=TopK(k=k), capacity_factor=capacity_factor)
    out = moe(x)
    stats = out.stats
    assert stats.dropped_pairs.item() == dropped_pairs
    assert stats.dropped_tokens.item() == dropped_tokens
    assert stats.tokens_per_expert.tolist() == [8, 8 if k == 2 else 0, 0, 0]  # before capacity
    assert stats.experts_per_token.item() == k
    kept_pairs = 8 * k - dropped_pairs
    assert stats.flops.item() == kept_pairs * 6 * D * H  # SwiGLU: 2 (2H x D) + 2 (D x H)
    lost = 8 - dropped_tokens
    assert not out.output[lost:].any()  # dropped tokens get 0: the residual carries them
    assert out.output[:lost].abs().sum(dim=1).gt(0).all()


def test_top_2_tight_capacity_drops_second_choices_before_whole_tokens():
    # even tokens have logits (10, 5, 0, 0), odd ones (5, 10, 0, 0); capacity ceil(0.75 * 16 / 4) = 3
    moe = layer(router=TopK(k=2), capacity_factor=0.75)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:2, 0] = torch.tensor([10.0, 5.0])  # feature 0 is 1 on even tokens
        moe.gate.weight[:2, 1] = torch.tensor([5.0, 10.0])  # feature 1 is 1 on odd tokens
    x = torch.zeros(8, D)
    x[0::2, 0], x[1::2, 1] = 1.0, 1.0
    out = moe(x)
    first = out.routing.probs.argmax(1)
    assert first.tolist() == [0, 1] * 4
    # each expert keeps the first choices of its first 3 tokens; tokens 6 and 7 lose both experts
    assert out.stats.dropped_pairs.item() == 16 - 6
    assert out.stats.dropped_tokens.item() == 2
    assert not out.output[6:].any() and out.output[:6].abs().sum(1).gt(0).all()


@pytest.mark.parametrize("k, renormalize", [(1, False), (1, True), (2, True), (2, False)])
def test_layer_output_is_the_dense_mixture_of_top_k(k, renormalize):
    moe, x = layer(router=TopK(k=k, renormalize=renormalize)), tokens(10)
    p = router_probs(moe, x)
    top = p.topk(k, dim=1)
    g = top.values / top.values.sum(1, keepdim=True) if renormalize else top.values  # Switch: P_max
    torch.testing.assert_close(
        moe(x).output, mixture(moe, x, torch.zeros_like(p).scatter(1, top.indices, g))
    )


# ---- GW broadcast in the layer ---------------------------------------------------------


def test_gw_training_is_the_dense_mixture_and_eval_is_top_k():
    moe, x = layer(router=GWBroadcast(TopK(k=2), threshold=0.0)), tokens(10)
    p = router_probs(moe, x)
    moe.train()
    out = moe(x)
    torch.testing.assert_close(out.output, mixture(moe, x, p))
    assert out.stats.broadcast_ratio.item() == 1 and out.stats.experts_per_token.item() == E

    moe.eval()
    top2 = p.topk(2, dim=1)
    w = torch.zeros_like(p).scatter(1, top2.indices, top2.values / top2.values.sum(1, keepdim=True))
    out = moe(x)
    torch.testing.assert_close(out.output, mixture(moe, x, w))
    assert out.stats.broadcast_ratio.item() == 0 and out.stats.experts_per_token.item() == 2


def test_gw_max_slots_counts_per_sequence():
    moe = layer(router=GWBroadcast(TopK(k=2), threshold=0.0, max_slots=2))
    out = moe(tokens(3, 5))
    assert out.routing.broadcast.view(3, 5).tolist() == [[True, True, False, False, False]] * 3


# ---- shared experts (DeepSeekMoE, Qwen2-MoE) -------------------------------------------

HS = 12  # width of the shared expert in these tests


def swiglu_by_hand(x, gate_up, down):
    """down(silu(x W_g^T) * x W_u^T), with W_g and W_u the halves of gate_up (2h, d)."""
    w_g, w_u = gate_up.detach().chunk(2, dim=0)
    g = x @ w_g.T
    return (g * torch.sigmoid(g) * (x @ w_u.T)) @ down.detach().T


def test_shared_expert_leaves_the_routed_weights_unchanged():
    plain, shared = layer(), layer(shared_hidden=HS, shared_gate=True)
    for name, p in plain.named_parameters():
        assert torch.equal(p, shared.get_parameter(name)), name
    new = set(dict(shared.named_parameters())) - set(dict(plain.named_parameters()))
    assert new == {"shared.gate_up", "shared.down", "shared_gate.weight"}
    assert shared.shared.d_hidden == HS and shared.shared.num_experts == 1
    assert layer(activation="gelu", shared_hidden=HS).shared.activation == "gelu"
    assert plain.shared is None and plain.shared_gate is None


@pytest.mark.parametrize("gate", [False, True], ids=["deepseek", "qwen2_gate"])
def test_shared_expert_is_added_to_every_token_even_dropped_ones(gate):
    # capacity 2 on expert 0 (see forced_layer): tokens 2-7 lose their only expert
    moe, x = forced_layer(
        router=TopK(k=1, renormalize=True), capacity_factor=1.0, shared_hidden=HS, shared_gate=gate
    )
    plain, _ = forced_layer(router=TopK(k=1, renormalize=True), capacity_factor=1.0)
    shared = swiglu_by_hand(x, moe.shared.gate_up[0], moe.shared.down[0])  # (T, d)
    if gate:  # Qwen2-MoE: sigmoid(w^T x) * Shared(x)
        shared = torch.sigmoid(x @ moe.shared_gate.weight.detach().T) * shared
    out = moe(x)
    assert out.stats.dropped_tokens.item() == 6
    torch.testing.assert_close(out.output, plain(x).output + shared)
    torch.testing.assert_close(out.output[2:], shared[2:])  # the shared expert only


def test_shared_expert_flops_count_every_token():
    moe, x = forced_layer(router=TopK(k=1, renormalize=True), capacity_factor=1.0, shared_hidden=HS)
    # 2 kept pairs of the routed experts, 8 tokens through the shared one: 6 D H per SwiGLU
    assert moe(x).stats.flops.item() == 2 * 6 * D * H + 8 * 6 * D * HS


def test_shared_expert_gets_gradients():
    moe = layer(shared_hidden=HS, shared_gate=True)
    moe(tokens(10)).output.sum().backward()
    for p in [*moe.shared.parameters(), moe.shared_gate.weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "built, change",
    [({}, {"shared_hidden": HS}), ({"shared_hidden": HS}, {"shared_gate": True})],
)
def test_replace_config_refuses_to_change_the_shared_expert(built, change):
    name = next(iter(change))
    with pytest.raises(ValueError, match=f"cannot change {name}"):
        layer(**built).replace_config(**change)


# ---- fine-grained experts (DeepSeekMoE) ------------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_fine_grained_keeps_flops_and_parameters_per_token(m, activation):
    coarse = config(router=TopK(k=2, renormalize=False), activation=activation, shared_hidden=HS)
    fine = fine_grained(coarse, m)
    assert (fine.num_experts, fine.d_hidden) == (E * m, H // m)
    assert fine.router == TopK(k=2 * m, renormalize=False) and fine.shared_hidden == HS
    x = tokens(3, 5)
    coarse_moe, fine_moe = MoE(coarse), MoE(fine)
    assert fine_moe(x).stats.flops.item() == coarse_moe(x).stats.flops.item()
    assert sum(p.numel() for p in fine_moe.experts.parameters()) == sum(
        p.numel() for p in coarse_moe.experts.parameters()
    )


@pytest.mark.parametrize(
    "overrides, m, error, text",
    [
        ({"router": TopP()}, 2, TypeError, "has no k"),
        ({"router": GWBroadcast(TopK())}, 2, TypeError, "has no k"),
        ({}, 3, ValueError, f"d_hidden={H} is not divisible by m=3"),
        ({}, 0, ValueError, "m=0"),
        ({}, 2.0, TypeError, "m=2.0"),
    ],
)
def test_fine_grained_refuses(overrides, m, error, text):
    with pytest.raises(error, match=re.escape(text)):
        fine_grained(config(**overrides), m)


# ---- tokens with no expert -------------------------------------------------------------


class FixedMask:
    """A router that sends token t to the experts of ``mask[t]`` (none for an empty row)."""

    def __init__(self, mask):
        self.mask = torch.tensor(mask)

    def __call__(self, logits, *, training, seq_len=None):
        probs = logits.softmax(dim=-1)
        return Routing(logits=logits, probs=probs, mask=self.mask, weights=probs * self.mask)


def test_unrouted_tokens_are_counted_apart_from_dropped_ones():
    # tokens 2 and 4 get no expert; capacity ceil(0.8 * 5 pairs / 4) = 1 per expert: expert 0
    # keeps token 0 (uniform P: every token ranks expert 0 first), so token 1 loses its only
    # expert and token 3 keeps expert 1
    mask = [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]
    moe = layer(router=FixedMask([[bool(v) for v in row] for row in mask]), capacity_factor=0.8)
    torch.nn.init.zeros_(moe.gate.weight)
    out = moe(tokens(6))
    stats = out.stats
    assert stats.unrouted_tokens.item() == 2
    assert stats.dropped_tokens.item() == 1 and stats.dropped_pairs.item() == 2
    assert stats.experts_per_token.item() == pytest.approx(5 / 6)
    assert [bool(row.any()) for row in out.output] == [True, False, False, True, False, True]
    dropless = layer(router=TopK(k=1, renormalize=True))(tokens(6)).stats
    assert dropless.unrouted_tokens.item() == 0 == dropless.dropped_tokens.item()


def test_expert_choice_leaves_tokens_unrouted_and_drops_none():
    out = layer(router=ExpertChoice(capacity_factor=1.0))(tokens(3, 5))
    unrouted = ~out.routing.mask.any(1)  # (T,)
    assert out.stats.unrouted_tokens.item() == unrouted.sum().item() > 0
    assert out.stats.dropped_tokens.item() == 0
    assert not out.output.reshape(-1, D)[unrouted].any()  # only the residual carries them


# ---- padding ---------------------------------------------------------------------------

LENGTHS = (3, 5, 1)  # real tokens of each sequence of 5; the rest is padding


def padded(seed=1):
    """x (3, 5, d) and its mask (3, 5): sequence b holds LENGTHS[b] tokens, then padding."""
    mask = torch.arange(5)[None, :] < torch.tensor(LENGTHS)[:, None]  # (B, L)
    return tokens(3, 5, seed=seed), mask


PER_TOKEN = ["top_k", "switch", "top_p", "adaptive", "capacity_loop", "shared_expert"]


@pytest.mark.parametrize("name", PER_TOKEN)
def test_padding_is_routed_by_no_expert_and_counted_nowhere(name):
    # a router that decides per token gives the real tokens the decision it gives them alone
    # (a capacity counted on their pairs only); padding's output is 0, as if never there
    x, mask = padded()
    masked, alone = layer(**ROUTER_CONFIGS[name]), layer(**ROUTER_CONFIGS[name])
    out, ref = masked(x, mask=mask), alone(x[mask])
    assert out.routing.num_tokens == sum(LENGTHS) == ref.routing.num_tokens
    assert torch.equal(out.routing.mask, ref.routing.mask)
    torch.testing.assert_close(out.output[mask], ref.output)
    assert not out.output[~mask].any()
    for key in ("load_balance", "z_loss", "dynamic"):
        torch.testing.assert_close(out.losses[key], ref.losses[key])
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    for key in ("experts_per_token", "tokens_per_expert", "dropped_pairs", "flops"):
        assert torch.equal(getattr(out.stats, key), getattr(ref.stats, key)), key
    # padding carries no loss: the router's gradient is the real tokens' alone
    out.aux_loss.backward()
    ref.aux_loss.backward()
    torch.testing.assert_close(masked.gate.weight.grad, alone.gate.weight.grad)


def test_padding_left_out_changes_the_numbers_it_would_skew():
    x, mask = padded()
    moe = layer()
    out, unmasked = moe(x, mask=mask), moe(x)
    assert unmasked.routing.num_tokens == 15 and out.routing.num_tokens == 9
    assert out.stats.flops.item() == pytest.approx(unmasked.stats.flops.item() * 9 / 15)
    assert out.losses["load_balance"].item() != pytest.approx(
        unmasked.losses["load_balance"].item()
    )


def test_sequence_balance_over_each_sequences_real_tokens(randn):
    probs = randn(15, E).softmax(dim=-1)
    mask = probs > 0.2  # (T, E) a varying number of experts per token
    _, pad = padded()
    valid = pad.reshape(-1)  # (T,)
    k = 1.5
    starts = [5 * b for b in range(3)]
    by_hand = [
        seq_balance_by_hand(probs[s : s + n], mask[s : s + n], n, k)
        for s, n in zip(starts, LENGTHS)
    ]
    expected = sum(by_hand) / 3
    assert sequence_balance_loss(probs, mask, 5, k, valid=valid).item() == pytest.approx(expected)
    everything = torch.ones(15, dtype=torch.bool)
    assert sequence_balance_loss(probs, mask, 5, k, valid=everything).item() == pytest.approx(
        sequence_balance_loss(probs, mask, 5, k).item()
    )
    # a sequence with no real token is left out of the mean, not counted as 0
    empty = valid.clone()
    empty[10:] = False
    assert sequence_balance_loss(probs, mask, 5, k, valid=empty).item() == pytest.approx(
        sum(by_hand[:2]) / 2
    )
    # k None: the mean experts per real token
    ept = mask[valid].sum().item() / valid.sum().item()
    by_hand_ept = [
        seq_balance_by_hand(probs[s : s + n], mask[s : s + n], n, ept)
        for s, n in zip(starts, LENGTHS)
    ]
    assert sequence_balance_loss(probs, mask, 5, valid=valid).item() == pytest.approx(
        sum(by_hand_ept) / 3, rel=1e-6
    )


def test_layer_sequence_balance_counts_the_real_tokens_of_each_sequence():
    x, mask = padded()
    moe = layer()
    out = moe(x, mask=mask)
    p = router_probs(moe, x.reshape(-1, D))
    top2 = torch.zeros_like(p, dtype=torch.bool).scatter(1, p.topk(2, dim=1).indices, True)
    expected = sequence_balance_loss(p, top2, 5, 2, valid=mask.reshape(-1))
    assert out.losses["sequence_balance"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    "bad, error, text",
    [
        (torch.ones(3, 5), TypeError, "mask must be a bool tensor"),
        (torch.ones(15, dtype=torch.bool), ValueError, r"shape without d_model, \(3, 5\)"),
        ([True] * 15, TypeError, "got list"),
    ],
)
def test_a_bad_mask_is_refused_naming_it(bad, error, text):
    x, _ = padded()
    with pytest.raises(error, match=text):
        layer()(x, mask=bad)
    with pytest.raises(ValueError, match=r"valid must be a \(15,\) bool tensor"):
        sequence_balance_loss(
            torch.full((15, E), 0.25),
            torch.ones(15, E, dtype=torch.bool),
            5,
            2,
            valid=torch.ones(15),
        )


# ---- determinism -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ROUTER_CONFIGS)
def test_same_seed_same_output(name):
    x = tokens(2, 6)

    def run(seed):
        moe = layer(seed=seed, **ROUTER_CONFIGS[name])
        torch.manual_seed(seed)  # noisy top-k draws its noise from the global generator
        return moe(x).output

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


# ---- bad configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, text",
    [
        ({"router": TopK(k=5)}, "k=5"),
        ({"dispatch": "scatter"}, "'scatter'"),
        ({"activation": "tanh"}, "'tanh'"),
        ({"capacity_factor": 0}, "capacity_factor=0"),
    ],
)
def test_bad_config_raises_naming_the_value(overrides, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        MoE(config(**overrides))


@pytest.mark.parametrize(
    "overrides, error, text",
    [
        ({"shared_hidden": -1}, ValueError, "shared_hidden=-1"),
        ({"shared_hidden": 2.5}, TypeError, "shared_hidden=2.5"),
        ({"shared_hidden": HS, "shared_gate": 1}, TypeError, "shared_gate=1"),
        ({"shared_gate": True}, ValueError, "shared_gate=True needs a shared expert"),
        ({"seq_balance_coef": -1e-4}, ValueError, "seq_balance_coef=-0.0001"),
        ({"seq_balance_coef": math.nan}, ValueError, "seq_balance_coef=nan"),
    ],
)
def test_bad_shared_or_seq_balance_settings_raise_naming_the_value(overrides, error, text):
    with pytest.raises(error, match=re.escape(text)):
        config(**overrides)


def test_wrong_input_width_raises():
    with pytest.raises(ValueError, match=re.escape("(3, 7)")):
        layer()(torch.randn(3, 7))


# ---- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["top_k", "top_p", "adaptive", "capacity_loop", "shared_expert"])
def test_cuda_matches_cpu(name):
    moe, x = layer(**ROUTER_CONFIGS[name]), tokens(4, 16)
    expected = moe(x).output
    out = moe.to("cuda")(x.to("cuda")).output
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)


DTYPE_CONFIGS = {
    "sorted": {"dispatch": "sorted"},
    "loop": {"dispatch": "loop"},
    "shared_expert": {"shared_hidden": HS, "shared_gate": True},
}


@pytest.mark.parametrize("name", DTYPE_CONFIGS)
def test_autocast_experts_in_bfloat16_router_and_output_in_float32(name):
    moe, x = layer(**DTYPE_CONFIGS[name]), tokens(4, 16)
    expected = moe(x).output
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    assert out.routing.logits.dtype == torch.float32 and out.routing.probs.dtype == torch.float32
    assert out.output.dtype == torch.float32, "the output keeps the input's dtype"
    torch.testing.assert_close(out.output, expected, atol=5e-2, rtol=5e-2)  # bfloat16 experts
    (out.output.sum() + out.aux_loss).backward()
    assert x.grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in moe.parameters())


@pytest.mark.parametrize("name", DTYPE_CONFIGS)
def test_bfloat16_weights_and_inputs(name):
    moe, x = layer(**DTYPE_CONFIGS[name]), tokens(4, 16)
    expected = moe(x).output
    out = moe.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.output.dtype == torch.bfloat16 and out.routing.logits.dtype == torch.float32
    torch.testing.assert_close(out.output.float(), expected, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_cuda_autocast_runs_the_experts_as_grouped_gemms(monkeypatch):
    import torch.nn.functional as F

    from minimoe.experts import Experts

    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    calls = []
    original = Experts._grouped_mm
    monkeypatch.setattr(
        Experts, "_grouped_mm", lambda self, x, counts: calls.append(1) or original(self, x, counts)
    )
    moe = layer(d_model=64, d_hidden=128)  # sizes divisible by 8: the kernel's alignment
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(1))
    expected = moe(x).output
    moe, x = moe.to("cuda"), x.to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = moe(x)
    assert calls, "bf16 autocast on CUDA should take the grouped_mm path"
    assert out.output.dtype == torch.float32 and out.routing.logits.dtype == torch.float32
    torch.testing.assert_close(out.output.cpu(), expected, atol=5e-2, rtol=5e-2)

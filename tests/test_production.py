"""Today's production routers (minimoe/routing/production.py) against hand-worked values,
Hugging Face's DeepSeek-V3 router, and the loss-free balancing rule."""

import math
import re
import warnings

import pytest
import torch

from minimoe import routing
from minimoe.layer import MoE, MoEConfig, MoEStats
from minimoe.model import ModelConfig, TinyTransformer
from minimoe.routing import ExpertChoice, SigmoidTopK, expert_choice, sigmoid_top_k
from minimoe.train import TrainConfig, router_state_hook, train


def stats_with_load(load):
    counts = dict.fromkeys(MoEStats._fields, torch.zeros(()))
    return MoEStats(**counts | {"tokens_per_expert": torch.as_tensor(load)})


# ---- sigmoid scores, a bias that only selects ------------------------------------------------


def test_sigmoid_top_k_by_hand():
    s = torch.tensor([[0.9, 0.6, 0.5, 0.1]])
    logits = torch.log(s / (1 - s))  # sigmoid(logits) = s
    r = sigmoid_top_k(logits, k=2, scaling=2.5)
    assert r.mask.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(r.weights, torch.tensor([[0.9, 0.6, 0, 0]]) / 1.5 * 2.5)
    torch.testing.assert_close(r.probs, s / s.sum())  # normalized affinities
    # a bias of +0.5 on expert 2 moves it into S; its weight still comes from s alone
    biased = sigmoid_top_k(logits, k=2, bias=torch.tensor([0.0, 0.0, 0.5, 0.0]))
    assert biased.mask.tolist() == [[True, False, True, False]]
    torch.testing.assert_close(biased.weights, torch.tensor([[0.9, 0, 0.5, 0]]) / 1.4)
    plain = sigmoid_top_k(logits, k=2, renormalize=False)
    torch.testing.assert_close(plain.weights, torch.tensor([[0.9, 0.6, 0, 0]]))


def test_groups_left_out_stay_out_when_biased_scores_are_negative():
    # 6 experts in 2 groups of 3; s = 0.5 everywhere, so the bias alone decides: s + b is
    # group 0: (-0.05, -0.05, -0.05), best two sum -0.1; group 1: (0.1, 0.0, -3.0), sum 0.1
    bias = torch.tensor([-0.55, -0.55, -0.55, -0.4, -0.5, -3.5])
    r = sigmoid_top_k(torch.zeros(1, 6), k=3, bias=bias, n_group=2, topk_group=1)
    # group 1 only, even its -3.0: a left-out expert masked with 0 would beat it (0 > -3)
    assert r.mask.nonzero()[:, 1].tolist() == [3, 4, 5]
    assert routing.group_limited(torch.full((1, 4), -1.0), 2, 1)[0, 2:].isneginf().all()


def test_a_router_swapped_for_a_variant_keeps_its_state():
    layer = MoE(MoEConfig(d_model=4, d_hidden=4, num_experts=4, router=SigmoidTopK()))
    layer.router_state.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    layer.replace_config(router=SigmoidTopK(bias_rate=0.0))  # freeze the bias: not zero it
    assert layer.router_state.bias.tolist() == pytest.approx([0.1, -0.2, 0.3, 0.0])
    layer.replace_config(router=routing.TopK())  # no state: the bias goes
    assert dict(layer.router_state.named_buffers()) == {}
    layer.replace_config(router=SigmoidTopK())  # fresh state
    assert layer.router_state.bias.tolist() == [0.0] * 4


def test_softmax_scores_with_a_bias():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = logits.softmax(-1)
    r = sigmoid_top_k(
        logits, k=1, score="softmax", bias=torch.tensor([0.0, 1.0, 0, 0]), renormalize=False
    )
    assert r.mask.tolist() == [[False, True, False, False]]
    torch.testing.assert_close(r.weights[0, 1], p[0, 1])


def test_group_limited_selection_by_hand():
    # 8 experts in 4 groups of 2; a group scores the sum of its two scores
    s = torch.tensor([[0.9, 0.1, 0.45, 0.5, 0.8, 0.3, 0.2, 0.2]])  # groups: 1.0, 0.95, 1.1, 0.4
    logits = torch.log(s / (1 - s))
    r = sigmoid_top_k(logits, k=3, n_group=4, topk_group=2)
    # the two best groups are 2 and 0: experts 0, 1, 4, 5 allowed; the best three of them
    assert r.mask.nonzero()[:, 1].tolist() == [0, 4, 5]
    free = sigmoid_top_k(logits, k=3)
    assert free.mask.nonzero()[:, 1].tolist() == [0, 3, 4]  # without groups expert 3 (0.5) beats 5
    with pytest.raises(ValueError, match="k=5 is more than"):
        sigmoid_top_k(logits, k=5, n_group=4, topk_group=2)


def test_bias_gets_no_gradient_and_the_weights_none_from_it():
    logits = torch.randn(16, 8, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    r = sigmoid_top_k(logits, k=2, bias=bias)
    r.weights.sum().backward()
    assert bias.grad is None and logits.grad is not None
    moe = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=SigmoidTopK()))
    assert [n for n, _ in moe.named_buffers()] == ["router_state.bias"]
    assert "router_state.bias" not in dict(moe.named_parameters())


def test_update_moves_the_bias_against_the_load():
    spec, state = SigmoidTopK(bias_rate=0.01), {"bias": torch.zeros(4)}
    spec.update_state(state, stats_with_load([10, 2, 4, 4]))  # mean 5
    torch.testing.assert_close(state["bias"], torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    spec.update_state(state, stats_with_load([5, 5, 5, 5]))  # balanced: no change
    torch.testing.assert_close(state["bias"], torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_loss_free_balancing_evens_out_a_skewed_router():
    """No gradient at all: only the bias update, on a router that prefers expert 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 8, generator=g) + torch.tensor([2.0, 1, 0, 0, 0, 0, 0, 0])
    spec, state = SigmoidTopK(k=2, bias_rate=0.01), {"bias": torch.zeros(8)}

    def maxvio():
        load = spec(logits, training=True, state=state).mask.sum(0).float()
        return ((load.max() - load.mean()) / load.mean()).item()

    before = maxvio()
    for _ in range(300):
        load = spec(logits, training=True, state=state).mask.sum(0)
        spec.update_state(state, stats_with_load(load))
    assert before > 1.0 and maxvio() < 0.15
    assert state["bias"][0] < 0 < state["bias"][2]  # the favourite pays, the others gain


def test_training_updates_the_bias_once_per_step():
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_hidden=16, num_experts=4, router=SigmoidTopK(k=2, bias_rate=0.01))
    lm = TinyTransformer(ModelConfig(vocab_size=16, block_size=8, n_layers=1, moe=moe))
    idx = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    loads = []
    train(
        lm,
        lambda g: {"idx": idx, "targets": idx},
        TrainConfig(steps=3, progress=False),
        callback=lambda step, m, out: loads.append(out.layers[0].stats.tokens_per_expert.float()),
    )
    expected = sum(0.01 * torch.sign(load.mean() - load) for load in loads)
    bias = lm.blocks[0].ffn.router_state.bias
    torch.testing.assert_close(bias, expected)
    lm(idx)  # a forward pass (a cell run again) changes nothing
    torch.testing.assert_close(bias, expected)


def test_matches_hugging_face_deepseek_v3_router():
    cfg_mod = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip
    hf = cfg_mod.DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, 16, generator=g))
        hf.e_score_correction_bias.copy_(0.1 * torch.randn(16, generator=g))
    x = torch.randn(64, 16, generator=g)
    logits, hf_weights, hf_idx = hf(x)
    ours = sigmoid_top_k(
        logits, k=4, bias=hf.e_score_correction_bias, n_group=4, topk_group=2, scaling=2.5
    )
    hf_mask = torch.zeros_like(ours.mask).scatter_(1, hf_idx, True)
    assert torch.equal(ours.mask, hf_mask)
    dense = torch.zeros_like(ours.weights).scatter_(1, hf_idx, hf_weights)
    torch.testing.assert_close(ours.weights, dense, atol=1e-6, rtol=1e-5)


# ---- expert choice -----------------------------------------------------------------------------


def test_expert_choice_fills_every_expert_exactly():
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    r = expert_choice(logits, capacity_factor=2.0)  # C = ceil(2 * 12 / 4) = 6
    assert r.mask.sum(0).tolist() == [6, 6, 6, 6]
    torch.testing.assert_close(r.weights, r.probs * r.mask)
    for e in range(4):  # each expert holds its own top-6 tokens by P
        top = r.probs[:, e].topk(6).indices
        assert r.mask[top, e].all()
    assert r.expert_counts.sum() == 24  # 2 experts per token on average, not each


def test_expert_choice_by_hand_leaves_a_token_without_expert():
    # tokens 0 and 1 are every expert's favourites; token 2 is nobody's
    logits = torch.tensor([[3.0, 3.0], [2.0, 2.0], [0.0, 0.0]])
    r = expert_choice(logits, capacity_factor=1.0)  # C = ceil(3 / 2) = 2
    assert r.mask.tolist() == [[True, True], [True, True], [False, False]]
    assert r.expert_counts.tolist() == [2, 2, 0]


def test_expert_choice_in_a_causal_model_leaks_the_future():
    """The route of an early token depends on later tokens of the batch (Wang et al. warn)."""
    torch.manual_seed(0)
    moe = MoEConfig(
        d_model=16, d_hidden=16, num_experts=4, router=ExpertChoice(capacity_factor=1.0)
    )
    lm = TinyTransformer(ModelConfig(vocab_size=16, block_size=8, n_layers=1, moe=moe)).eval()
    idx = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 16  # only the last token of each sequence differs
    with torch.no_grad():
        a, b = lm(idx), lm(changed)
    first = slice(0, 7)  # positions that cannot see the last token under causal attention
    routes_a = a.layers[0].routing.mask.view(4, 8, 4)[:, first]
    routes_b = b.layers[0].routing.mask.view(4, 8, 4)[:, first]
    assert not torch.equal(routes_a, routes_b)
    assert not torch.allclose(a.logits[:, first], b.logits[:, first])
    # the same model with top-k routing is causal: earlier positions are untouched
    topk = TinyTransformer(ModelConfig(vocab_size=16, block_size=8, n_layers=1)).eval()
    with torch.no_grad():
        torch.testing.assert_close(topk(idx).logits[:, first], topk(changed).logits[:, first])


# ---- specs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda: SigmoidTopK(k=0), "k=0"),
        (lambda: SigmoidTopK(score="relu"), "score='relu'"),
        (lambda: SigmoidTopK(bias_rate=-1e-3), "bias_rate=-0.001"),
        (lambda: SigmoidTopK(bias_rate=math.nan), "bias_rate=nan"),
        (lambda: SigmoidTopK(n_group=2, topk_group=3), "topk_group=3"),
        (lambda: SigmoidTopK(scaling=0), "scaling=0"),
        (lambda: ExpertChoice(capacity_factor=0), "capacity_factor=0"),
        (lambda: MoEConfig(num_experts=8, router=SigmoidTopK(n_group=3)), "n_group=3"),
        (
            lambda: MoEConfig(num_experts=4, router=ExpertChoice(capacity_factor=5.0)),
            "capacity_factor=5.0",
        ),
    ],
)
def test_bad_settings_raise_naming_the_value(make, text):
    with pytest.raises((ValueError, TypeError), match=re.escape(text)):
        make()


def test_registry_and_checkpoint_round_trip():
    for spec in (SigmoidTopK(k=4, n_group=2, topk_group=1, scaling=2.5), ExpertChoice(1.5)):
        assert routing.router_from_dict(routing.router_to_dict(spec)) == spec
    assert routing.router_from_name("expert_choice", capacity_factor=1.0) == ExpertChoice(1.0)


def hand_loop(lm, idx, steps, hook):
    """A hand-written training loop; with ``hook``, router_state_hook is its one extra line."""
    opt = torch.optim.SGD(lm.parameters(), lr=0.0)  # the weights stay put: only the bias moves
    remove = router_state_hook(opt, lm) if hook else None
    loads = []
    for _ in range(steps):
        out = lm(idx, targets=idx)
        loads.append(out.layers[0].stats.tokens_per_expert.float())
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        opt.step()
    if remove is not None:
        remove()
    return loads


def skewed_lm():
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_hidden=16, num_experts=4, router=SigmoidTopK(k=2, bias_rate=0.01))
    return TinyTransformer(ModelConfig(vocab_size=16, block_size=8, n_layers=1, moe=moe))


def test_router_state_hook_updates_the_bias_after_each_step_as_train_does():
    lm, idx = skewed_lm(), torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    loads = hand_loop(lm, idx, 3, hook=True)
    bias = lm.blocks[0].ffn.router_state.bias
    torch.testing.assert_close(bias, sum(0.01 * torch.sign(n.mean() - n) for n in loads))
    assert bias.abs().sum() > 0
    with torch.no_grad():
        lm(idx)  # evaluation forwards are not remembered
    hand_loop(lm, idx, 0, hook=True)
    torch.testing.assert_close(bias, sum(0.01 * torch.sign(n.mean() - n) for n in loads))


def test_a_stateful_router_never_updated_warns_once(monkeypatch):
    monkeypatch.setattr("minimoe.layer.STALE_AFTER", 3)
    lm, idx = skewed_lm(), torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"router_state_hook\(optimizer, model\)"):
        hand_loop(lm, idx, 3, hook=False)
    assert lm.blocks[0].ffn.router_state.bias.abs().sum() == 0  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hand_loop(lm, idx, 5, hook=True)  # updated after every step: never stale
        lm.eval()
        for _ in range(5):
            lm(idx)  # evaluation forwards are no training

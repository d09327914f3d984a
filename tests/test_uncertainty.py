"""Uncertainty measures at their extremes, on hand-worked routings, and on a tiny model."""

import math

import pytest
import torch

from minimoe.analysis import expert_for_cluster
from minimoe.layer import MoEConfig, moe_layers
from minimoe.model import ModelConfig, MoERegressor, TinyTransformer
from minimoe.routing import Routing, TopK, gw_broadcast, top_k
from minimoe.uncertainty import (
    binned_rate,
    changed,
    flip_rate,
    is_uncertain,
    layer_summary,
    perturbed_inputs,
    perturbed_router,
    rates_by_uncertainty,
    record_routing,
    swap_first_choice,
    swapped_first_choice,
    uncertain_in_any_layer,
    uncertain_share,
    uncertain_share_per_layer,
    wrong_expert,
)


def routing_of(probs):
    """A top-1 Routing whose softmax is exactly ``probs`` (T, E)."""
    return top_k(torch.as_tensor(probs, dtype=torch.float32).log(), k=1)


@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_extremes_one_hot_is_zero_uniform_is_ln_e_or_one(num_experts):
    one_hot = top_k(torch.tensor([[50.0] + [0.0] * (num_experts - 1)]), k=1)
    uniform = top_k(torch.zeros(1, num_experts), k=1)
    (hot,), (flat,) = layer_summary([one_hot], 0.5), layer_summary([uniform], 0.5)
    assert hot["entropy"] == pytest.approx(0, abs=1e-12) and hot[
        "normalized_entropy"
    ] == pytest.approx(0, abs=1e-12)
    assert hot["top_gap"] == pytest.approx(1) and hot["uncertain_share"] == 0
    assert flat["entropy"] == pytest.approx(math.log(num_experts)) and flat[
        "normalized_entropy"
    ] == pytest.approx(1)
    assert flat["top_gap"] == 0 and flat["uncertain_share"] == 1
    # the threshold is inclusive: a uniform router is uncertain at the maximum threshold
    assert (
        is_uncertain(uniform, 1.0).item()
        and is_uncertain(uniform, math.log(num_experts), "entropy").item()
    )
    assert not is_uncertain(one_hot, 1e-3).item()


@pytest.mark.parametrize("measure, threshold", [("normalized_entropy", 0.6), ("entropy", 1.0)])
def test_is_uncertain_is_the_gw_broadcast_rule(measure, threshold):
    r = top_k(torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) * 2, k=2)
    assert torch.equal(
        is_uncertain(r, threshold, measure), gw_broadcast(r, threshold, measure).broadcast
    )


def test_shares_per_layer_and_any_layer():
    a = routing_of([[0.25] * 4, [0.97, 0.01, 0.01, 0.01], [0.25] * 4])
    b = routing_of([[0.97, 0.01, 0.01, 0.01], [0.97, 0.01, 0.01, 0.01], [0.25] * 4])
    assert uncertain_share(a, 0.5) == pytest.approx(2 / 3)
    assert uncertain_share_per_layer([a, b], 0.5) == pytest.approx([2 / 3, 1 / 3])
    assert uncertain_in_any_layer([a, b], 0.5).tolist() == [True, False, True]


def test_changed_first_choice_vs_set():
    before = top_k(torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]]), k=2)
    after = top_k(torch.tensor([[3.0, 1.0, 2.0, 0.0], [2.0, 3.0, 1.0, 0.0]]), k=2)
    assert changed(before, after, "first").tolist() == [False, True]  # token 1: top-1 swapped
    assert changed(before, after, "set").tolist() == [True, False]  # token 0: second choice moved
    with pytest.raises(ValueError, match="compare"):
        changed(before, after, "weights")


def test_wrong_expert_and_rates_hand_worked():
    r = routing_of(
        [
            [0.7, 0.1, 0.1, 0.1],
            [0.1, 0.7, 0.1, 0.1],
            [0.3, 0.2, 0.25, 0.25],
            [0.26, 0.24, 0.25, 0.25],
        ]
    )
    cluster = torch.tensor([0, 0, 1, 1])
    right = torch.tensor([0, 2])  # cluster 0 -> expert 0, cluster 1 -> expert 2
    wrong = wrong_expert(r, cluster, right)
    assert wrong.tolist() == [False, True, True, True]
    rates = rates_by_uncertainty(wrong, torch.tensor([False, False, True, True]))
    assert rates == {"uncertain": 1.0, "certain": 0.5, "uncertain_share": 0.5}
    assert math.isnan(rates_by_uncertainty(wrong, torch.zeros(4, dtype=torch.bool))["uncertain"])


def test_binned_rate_equal_count_bins():
    score = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    event = torch.tensor([1, 0, 1, 0, 1, 0])
    mean, rate, count = binned_rate(score, event, num_bins=3)
    torch.testing.assert_close(mean, torch.tensor([0.15, 0.4, 0.8]))
    torch.testing.assert_close(rate, torch.tensor([0.0, 0.5, 1.0]))
    assert count.tolist() == [2, 2, 2]
    with pytest.raises(ValueError):
        binned_rate(score, event, num_bins=7)


# ---- on a model ---------------------------------------------------------------------------


def toy_model():
    torch.manual_seed(0)
    return MoERegressor(8, 2, MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=TopK(k=2)))


def test_record_routing_restores_mode_and_matches_the_layer():
    model = toy_model().train()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    out, (r,) = record_routing(model, {"x": x})
    assert model.training and out.logits.shape == (32, 2)
    torch.testing.assert_close(r.probs, (x @ model.moe.gate.weight.detach().T).softmax(-1))


def test_perturbations_are_undone_and_zero_noise_never_flips():
    model = toy_model()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    w = model.moe.gate.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    with perturbed_router(model, 0.5, g):
        assert not torch.equal(model.moe.gate.weight, w)
        with perturbed_inputs(model, 0.5, g):
            _, (noisy,) = record_routing(model, {"x": x})
    assert torch.equal(model.moe.gate.weight, w)
    _, (clean,) = record_routing(model, {"x": x})
    assert not torch.equal(noisy.probs, clean.probs)
    _, (again,) = record_routing(model, {"x": x})  # hooks are gone
    assert torch.equal(again.probs, clean.probs)
    (none,) = flip_rate(model, {"x": x}, draws=2)
    assert none.sum() == 0


def test_flips_grow_with_noise_and_are_seeded():
    model = toy_model()
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    (small,) = flip_rate(model, {"x": x}, input_noise=0.05, draws=4)
    (large,) = flip_rate(model, {"x": x}, input_noise=1.0, draws=4)
    (again,) = flip_rate(model, {"x": x}, input_noise=1.0, draws=4)
    assert 0 <= small.mean() < large.mean() <= 1 and torch.equal(large, again)
    (router,) = flip_rate(model, {"x": x}, router_noise=1.0, draws=4)
    assert router.mean() > 0


def test_expert_for_cluster_then_wrong_expert_on_a_planted_router():
    # clusters 0-2 go to expert c + 1; cluster 3 splits 1:1 between experts 1 and 0, and a
    # tie goes to the lower index (torch.argmax returns the first maximum): expert 0
    probs = torch.full((8, 4), 0.1)
    cluster = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    probs[torch.arange(8), (cluster + 1) % 4] = 0.7
    probs[6] = torch.tensor([0.1, 0.7, 0.1, 0.1])
    r = Routing(probs.log(), probs, probs > 0.5, probs * (probs > 0.5))
    right = expert_for_cluster(r, cluster)
    assert right.tolist() == [1, 2, 3, 0]
    assert wrong_expert(r, cluster, right).tolist() == [False] * 6 + [True, False]


def test_explorer_builds_on_recorded_routing():
    widgets = pytest.importorskip("ipywidgets")
    from minimoe.widgets import uncertainty_explorer

    _, routings = record_routing(toy_model(), {"x": torch.randn(16, 8)})
    box = uncertainty_explorer({"toy": routings})
    assert isinstance(box, widgets.VBox)


# ---- sensitivity to the choice -----------------------------------------------------------


def test_swap_first_choice_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    logits = probs.log()
    r = top_k(logits, k=2)  # renormalized: weights sum to 1
    s = swap_first_choice(r)
    assert s.mask.tolist() == [[False, True, True], [True, False, True], [False, True, True]]
    torch.testing.assert_close(s.weights[0], torch.tensor([0.0, 0.6, 0.4]))
    torch.testing.assert_close(s.weights.sum(1), torch.ones(3))
    raw = top_k(logits, k=1, renormalize=False)  # Switch: weight p_max, kept as total
    torch.testing.assert_close(swap_first_choice(raw).weights[2], torch.tensor([0.0, 0.6, 0.0]))
    everyone = Routing(logits, probs, torch.ones(3, 3, dtype=torch.bool), probs)
    same = swap_first_choice(everyone)  # no expert left to swap in: unchanged
    assert torch.equal(same.mask, everyone.mask) and torch.equal(same.weights, everyone.weights)


def test_swapped_first_choice_changes_the_output_and_restores_the_model():
    torch.manual_seed(0)
    model = TinyTransformer(ModelConfig(moe=MoEConfig(d_model=32, d_hidden=32, num_experts=4)))
    model.eval()
    idx = torch.randint(0, 256, (2, 16))
    configs = [layer.config for layer in moe_layers(model)]
    with torch.no_grad():
        before = model(idx=idx).logits
        with swapped_first_choice(model):
            swapped = model(idx=idx)
        after = model(idx=idx).logits
    assert torch.equal(before, after), "the routers are back"
    assert [layer.config for layer in moe_layers(model)] == configs
    assert (swapped.logits - before).abs().max() > 1e-3
    first = [r.probs.argmax(1) for r in (layer.routing for layer in swapped.layers)]
    assert all(
        (~layer.routing.mask.gather(1, f[:, None])).all() for layer, f in zip(swapped.layers, first)
    )
    with pytest.raises(ValueError, match="no MoE layer"):
        with swapped_first_choice(torch.nn.Linear(2, 2)):
            pass


@pytest.mark.gpu
def test_recording_and_flips_take_a_cpu_batch_for_a_cuda_model():
    torch.manual_seed(0)
    model = MoERegressor(16, 8, MoEConfig(d_model=16, d_hidden=32, num_experts=4, router=TopK(k=2)))
    batch = {"x": torch.randn(64, 16)}
    _, cpu = record_routing(model, batch)
    _, gpu = record_routing(model.to("cuda"), batch)  # the batch stays on the CPU
    assert gpu[0].probs.device.type == "cpu"
    torch.testing.assert_close(gpu[0].probs, cpu[0].probs, rtol=1e-4, atol=1e-5)
    (flips,) = flip_rate(model, batch, input_noise=0.1, draws=2)
    assert flips.shape == (64,)

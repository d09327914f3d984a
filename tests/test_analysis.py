"""Routing statistics against hand-computed values, and the recorder's bookkeeping."""

from __future__ import annotations

import pytest
import torch

from minimoe import analysis
from minimoe.layer import MoE, MoEConfig
from minimoe.routing import Routing, top_k


def _one_hot_logits(first: list[int], num_experts: int) -> torch.Tensor:
    """Logits whose first choice for token t is expert ``first[t]``."""
    return torch.nn.functional.one_hot(torch.tensor(first), num_experts).float() * 5.0


def test_load_per_expert_by_hand():
    # top-2 sets {0, 1}, {0, 2}, {1, 2}, {0, 1}: expert 0 gets 3 of the 8 pairs, 1 gets 3, 2 gets 2
    logits = torch.tensor([[3.0, 2, 0], [3, 0, 2], [0, 3, 2], [3, 2, 0]])
    routing = top_k(logits, 2)
    torch.testing.assert_close(
        analysis.load_per_expert(routing), torch.tensor([3 / 8, 3 / 8, 2 / 8])
    )
    assert analysis.load_imbalance(routing) == pytest.approx((3 / 8) / (1 / 3))
    assert analysis.experts_per_token(routing) == 2.0
    one = top_k(_one_hot_logits([2, 2, 0, 2], 4), 1)  # 3 of 4 tokens on expert 2, none on 1 or 3
    assert analysis.load_per_expert(one).tolist() == [0.25, 0.0, 0.75, 0.0]


def test_capacity_report_top_2_drops_pairs_not_whole_tokens():
    # first choices: tokens 0, 1, 2 -> expert 0, token 3 -> expert 3;
    # second choices: tokens 0, 1 -> expert 1, tokens 2, 3 -> expert 2
    logits = torch.tensor([[4.0, 2, 0, 0], [4, 2, 0, 0], [4, 0, 2, 0], [0, 0, 2, 4]])
    rep = analysis.capacity_report(logits, k=2, capacity_factor=0.5)
    assert rep.capacity == 1  # ceil(0.5 * 8 pairs / 4 experts)
    assert rep.tokens_per_expert.tolist() == [3, 2, 2, 1]
    # one slot each; first choices go first, then earlier tokens: expert 0 keeps token 0, expert 1
    # token 0 (second choice), expert 2 token 2 (second choice, before token 3), expert 3 token 3
    assert rep.kept_per_expert.tolist() == [1, 1, 1, 1]
    assert rep.dropped_pairs == 4  # (1, 0), (2, 0), (1, 1), (3, 2)
    assert rep.dropped_tokens == 1  # only token 1 lost both experts; 2 and 3 keep one each


def test_expert_for_cluster_counts_each_token():
    # cluster 0: experts 1, 1, 1, 0, 0 (3 vs 2); cluster 1: 2, 0, 2; cluster 2: 3, 1, 3, 3
    cluster = torch.tensor([0, 1, 0, 2, 0, 1, 2, 0, 2, 1, 0, 2])
    first = [1, 2, 0, 3, 1, 0, 1, 0, 3, 2, 1, 3]
    routing = top_k(_one_hot_logits(first, 4), 1)
    assert analysis.expert_for_cluster(routing, cluster).tolist() == [1, 2, 3]
    # a cluster with no token falls back to expert 0
    assert analysis.expert_for_cluster(routing, cluster, num_clusters=4).tolist() == [1, 2, 3, 0]
    assert analysis.expert_for_cluster(routing, cluster.int()).tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "cluster, num_clusters, error, match",
    [
        (torch.tensor([0.0, 1.0, 1.0]), None, TypeError, "integer labels.*float32"),
        ([0, 1, 1], None, TypeError, "Tensor of labels, got list"),
        (torch.tensor([0, 1]), None, ValueError, r"shape \(3,\).*got \(2,\)"),
        (torch.tensor([[0, 1, 1]]), None, ValueError, r"got \(1, 3\)"),
        (torch.tensor([0, -1, 1]), None, ValueError, r"in \[0, 2\), got -1"),
        (torch.tensor([0, 1, 2]), 2, ValueError, r"in \[0, 2\), got 2"),
        (torch.tensor([0, 1, 1]), 0, ValueError, "num_clusters must be >= 1, got num_clusters=0"),
        (torch.tensor([0, 1, 1]), 2.0, TypeError, "num_clusters=2.0"),
    ],
)
def test_expert_for_cluster_refuses_bad_clusters(cluster, num_clusters, error, match):
    routing = top_k(_one_hot_logits([0, 1, 1], 2), 1)
    with pytest.raises(error, match=match):
        analysis.expert_for_cluster(routing, cluster, num_clusters)


def _model_and_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4))).eval()
    return model, torch.randn(5, 8)


@torch.no_grad()
def test_recorder_entered_twice_in_a_row_appends():
    model, x = _model_and_input()
    rec = analysis.RoutingRecorder(model)
    with rec:
        model(x)
    model(x)  # outside: not recorded
    with rec:
        model(x)
    assert rec.routing(0).num_tokens == 10
    assert not model[0]._forward_hooks


@torch.no_grad()
def test_recorder_nested_is_refused_and_counts_once():
    model, x = _model_and_input()
    rec = analysis.RoutingRecorder(model)
    with rec:
        with pytest.raises(RuntimeError, match="already recording"):
            with rec:
                pass
        model(x)
    assert rec.routing(0).num_tokens == 5  # not 10: one hook per layer
    assert not model[0]._forward_hooks


# ---- tokens per expert count, and MaxVio -----------------------------------------------


def test_expert_count_shares_by_hand():
    # token 0 -> {0}, 1 -> {}, 2 -> {0, 1, 2}, 3 -> {1}, 4 -> {}: counts 1, 0, 3, 1, 0
    mask = torch.tensor(
        [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool
    )
    logits = torch.zeros(5, 4)
    routing = Routing(logits=logits, probs=logits.softmax(-1), mask=mask, weights=mask * 0.25)
    assert analysis.expert_count_shares(routing) == pytest.approx({0: 0.4, 1: 0.4, 2: 0.0, 3: 0.2})
    top2 = top_k(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), 2)
    assert analysis.expert_count_shares(top2) == {0: 0.0, 1: 0.0, 2: 1.0}
    assert analysis.expert_count_shares(top_k(torch.zeros(0, 4), 2)) == {}


@pytest.mark.parametrize(
    "load, maxvio",
    [
        ([2, 2, 2, 2], 0.0),  # balanced
        ([3, 1, 2, 2], 0.5),  # mean 2: (3 - 2) / 2
        ([8, 0, 0, 0], 3.0),  # one expert takes all: E - 1
        ([0.5, 0.25, 0.25], 0.5),  # shares work as well as counts (mean 1/3)
    ],
)
def test_max_violation_by_hand(load, maxvio):
    assert analysis.max_violation(torch.tensor(load)) == pytest.approx(maxvio)


def test_max_violation_of_a_routing_is_that_of_its_tokens_per_expert():
    routing = top_k(_one_hot_logits([2, 2, 0, 2], 4), 1)  # loads 1, 0, 3, 0: mean 1
    assert analysis.max_violation(routing) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "load, error, match",
    [
        (torch.tensor([]), ValueError, r"non-empty \(E,\) tensor, got shape \(0,\)"),
        (torch.ones(2, 3), ValueError, r"got shape \(2, 3\)"),
        (torch.zeros(4), ValueError, "load has no tokens"),
        ([1, 2], TypeError, "Tensor or a Routing, got list"),
    ],
)
def test_max_violation_refuses_an_empty_load(load, error, match):
    with pytest.raises(error, match=match):
        analysis.max_violation(load)


def test_routing_of_a_layer_out_of_range_names_the_layer_count():
    layer = MoE(MoEConfig(d_model=4, d_hidden=4, num_experts=4))
    with analysis.RoutingRecorder(layer) as rec:
        layer(torch.randn(3, 4))
    assert rec.routing(-1).num_tokens == 3  # the top layer, as a list reads it
    for bad in (1, -2, "0"):
        with pytest.raises(IndexError, match=r"the model has 1 MoE layers, got layer="):
            rec.routing(bad)

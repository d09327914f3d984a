"""Chapter 9's experiment (course/ondemand.py): its runs, what its compute counts, its family."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from course import harness, ondemand, testbed
from minimoe.routing import ExpertThreshold, ReMoE, ScoreTopK, SeqTopK, TopK
from minimoe.routing.dynamic import expert_cutoff

TINY = testbed.TestbedSetup(n_train=128, n_test=512, steps=2, batch_size=16, mixing="dirichlet")
CLI = ["--steps", "2", "--n-train", "128", "--n-test", "512", "--batch-size", "16"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> harness.Results:
    """Every declared run, two seeds, two steps, through the harness and back from disk."""
    out = tmp_path_factory.mktemp("ondemand")
    exp = ondemand.OnDemand(TINY)
    exp.run_all(out, seeds=[0, 1], progress=False)
    return harness.load(exp, out / "results.json")


def test_every_run_trains_and_is_stored_in_the_harness_format(results):
    assert results.runs == list(ondemand.RUNS) and results.seeds == [0, 1]
    for name in ondemand.RUNS:
        measures = results.record(name, 0)["measures"]
        for m in testbed.LEVELS:
            assert measures[f"expert_flops_per_token@{m}"] >= 0
            assert 0 <= measures[f"no_expert_share@{m}"] <= 1
    assert all(run.losses == "paper" for run in ondemand.RUNS.values())


def test_every_router_is_declared_at_two_or_more_levels_with_a_matched_top_k():
    by_router: dict[str, set[float]] = {}  # "null k=3" -> "null"; the anchors are "top-k"
    for name in ondemand.RUNS:
        router = name.rsplit(" ", 1)[0] if " " in name else "top-k"
        by_router.setdefault(router, set()).add(ondemand.TARGETS[name])
    assert all(len(levels) >= 2 for levels in by_router.values()), by_router
    assert {ondemand.anchor(n) for n in ondemand.RUNS} <= set(ondemand.ANCHORS)


def test_targets_are_the_routers_own_settings():
    for name, run in ondemand.RUNS.items():
        r, target = run.router, ondemand.TARGETS[name]
        if isinstance(r, (ReMoE, ExpertThreshold, SeqTopK)):
            assert r.experts_per_token == target
        elif isinstance(r, ScoreTopK):  # k of E + 8 columns, at uniform use
            assert target == r.k * 8 / 16
            assert r.experts_per_token in (None, target)  # LongCat's: steered to it
        elif isinstance(r, TopK):
            assert r.k == target


def _model(router, exp: ondemand.OnDemand):
    return exp.model(ondemand.Run(router).moe_config(exp.base_moe()), seed=0)


@pytest.mark.parametrize("kind", ["null", "identity"])
def test_an_input_that_picks_free_experts_uses_fewer_true_experts_and_flops(kind):
    exp = ondemand.OnDemand(replace(TINY, n_test=2000))
    test = exp.test_set
    model = _model(ScoreTopK(k=3, **{f"{kind}_experts": 8}), exp)
    content = test.content.shape[1]
    with torch.no_grad():  # true logits 0; the 8 free columns read function 0's tag
        model.moe.gate.weight.zero_()
        model.moe.gate_extra.weight.zero_()
        model.moe.gate_extra.weight[:, content] = 50.0
    has_0 = test.member[:, 0]  # (N,) inputs that need function 0: all 3 picks free
    measured = ondemand.expert_compute(model, test)
    per_pair = model.moe.experts.flops_per_assignment()
    assert measured["no_expert_share"] == pytest.approx(has_0.float().mean().item())
    for m in testbed.LEVELS:
        at = test.level == m
        true_experts = 3 * (~has_0[at]).float().mean().item()
        assert measured[f"expert_flops_per_token@{m}"] == pytest.approx(true_experts * per_pair)
        assert measured[f"no_expert_share@{m}"] == pytest.approx(has_0[at].float().mean().item())
    everything = exp.evaluate(model, test)
    assert everything["experts_per_token"] * per_pair == pytest.approx(
        everything["expert_flops_per_token"]
    ), "MoEStats.flops counts the true experts' pairs only"


def test_free_experts_at_uniform_scores_leave_k_e_over_e_plus_m_true_experts():
    torch.manual_seed(0)
    logits = torch.randn(20000, 16)  # every column equally likely to be picked
    for k, target in ((3, 1.5), (4, 2.0), (6, 3.0)):
        routing = ScoreTopK(k=k, null_experts=8)(logits, training=False)
        assert routing.mask.shape == (20000, 8), "the Routing covers the true experts only"
        assert routing.expert_counts.float().mean().item() == pytest.approx(target, abs=0.03)


def test_seqtopk_spends_exactly_its_k_and_a_threshold_its_share():
    torch.manual_seed(0)
    logits = torch.randn(256, 8)
    for k in (1, 2, 3):
        assert SeqTopK(experts_per_token=k)(logits, training=False).mask.sum() == 256 * k
    state = {"threshold": expert_cutoff(logits, 1.5), "updates": torch.ones((), dtype=torch.long)}
    routing = ExpertThreshold(experts_per_token=1.5)(logits, training=False, state=state)
    assert routing.expert_counts.float().mean().item() == 1.5, "48 of 256 tokens per expert"


def test_the_top_2_model_is_also_served_at_other_k(results):
    extra = results.record(ondemand.SERVED_RUN, 0)["extra"]
    for k in ondemand.SERVED_KS:
        for m in testbed.LEVELS:
            assert extra[ondemand.served(k, f"experts_per_token@{m}")] == k
        assert extra[ondemand.served(k, "expert_flops_per_token")] == pytest.approx(
            k * results.record("top-1", 0)["measures"]["expert_flops_per_token"]
        )
    assert not any(k.startswith("served") for k in results.record("top-1", 0)["extra"])


def test_the_family_pairs_each_dynamic_run_with_its_declared_top_k(results):
    dynamic = [n for n in ondemand.RUNS if n not in ondemand.ANCHORS]
    assert [a for a, _, _ in ondemand.FAMILY] == dynamic
    for a, b, measure in ondemand.FAMILY:
        assert b == f"top-{math.ceil(ondemand.TARGETS[a])}" and measure == "rel_error"
    judged = ondemand.family(results)
    parts = [ondemand.CONTROL, ondemand.FAMILY, ondemand.SERVED, ondemand.ALLOCATION]
    assert len(judged) == sum(map(len, parts))
    assert all(c.p_holm is not None and c.n == 2 for c in judged)
    assert [(c.a, c.b, c.measure) for c in judged[:2]] == [
        ("top-1", "top-2", "rel_error@2"),
        ("top-1", "top-2", "rel_error@3"),
    ]
    served = len(ondemand.CONTROL) + len(ondemand.FAMILY)
    assert [(c.a, c.b) for c in judged[served : served + 2]] == [
        ("top-2 served at k=1", "top-1"),
        ("top-2 served at k=3", "top-3"),
    ]
    allocation = judged[served + 2 :]
    assert [c.a for c in allocation] == [f"{n} at level 3" for n in ondemand.ALLOCATION]
    for c, run in zip(allocation, ondemand.ALLOCATION):
        hard = results.values(run, "experts_per_token@3")
        easy = results.values(run, "experts_per_token@1")
        assert c.diffs == pytest.approx([h - e for h, e in zip(hard, easy)])
        assert c.lower_is_better is None
        no_curve = results.curve(run, 0, "experts_per_token@3") is None
        assert (c.drift is None) == no_curve


def test_allocation_runs_are_the_dynamic_ones_at_two_experts():
    assert ondemand.ALLOCATION == [
        n for n in ondemand.RUNS if n not in ondemand.ANCHORS and ondemand.TARGETS[n] == 2.0
    ]
    assert (
        len(ondemand.ALLOCATION) == 8
    )  # null, identity, longcat, remoe, threshold, seqtopk, top-p, adaptive


def test_the_longcat_runs_are_the_identity_runs_steered_by_the_bias():
    """They differ from the identity runs only where the compute is steered: the bias and its
    target instead of the balance loss over the free experts."""
    for k in (3, 4, 6):
        identity, longcat = (
            ondemand.RUNS[f"{kind} k={k}"].router for kind in ("identity", "longcat")
        )
        steered = replace(identity, balance_free=False, selection_bias=True,
                          bias_rate=ondemand.LONGCAT_RATE, experts_per_token=k * 8 / 16)  # fmt: skip
        assert steered == longcat


def test_summary_and_plots_read_every_run(results):
    rows = ondemand.summary(results)
    assert [r["run"] for r in rows] == list(ondemand.RUNS)
    top2 = next(r for r in rows if r["run"] == "top-2")
    assert top2["rel_error"] == pytest.approx(sum(results.values("top-2", "rel_error")) / 2)
    assert top2["experts_per_token"] == 2 and top2["experts_per_token_std"] == 0
    assert ondemand.kind("null k=4") == "null" and ondemand.kind("top-3") == "top-k"
    ondemand.plot_pareto(results)
    ondemand.plot_allocation(results, ["top-2", *ondemand.ALLOCATION])


def test_command_writes_results(tmp_path):
    from course.__main__ import main

    out = tmp_path / "od"
    main(["ondemand", *CLI, "--seeds", "0", "--runs", "top-2", "null k=3", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["experiment"] == "ondemand" and saved["setup"]["mixing"] == "dirichlet"
    assert [r["run"] for r in saved["results"]] == ["top-2", "null k=3"]
    assert saved["runs"]["null k=3"]["moe"]["router"]["null_experts"] == 8


# ---- on text -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_results(tmp_path_factory) -> harness.Results:
    """The text runs, two seeds, a few steps, through the harness and back from disk."""
    from course.lm import LMSetup

    out = tmp_path_factory.mktemp("ondemand_text")
    exp = ondemand.OnDemandText(LMSetup(steps=4, eval_windows=32))
    exp.eval_every = 2
    exp.run_all(out, seeds=[0, 1], progress=False)
    return harness.load(exp, out / "results.json")


def test_the_text_runs_are_the_causal_dynamic_rules_beside_top_2():
    assert list(ondemand.TEXT_RUNS) == ["top-2", "null k=4", "remoe 2", "threshold 2"]
    assert all(ondemand.TEXT_RUNS[n] is ondemand.RUNS[n] for n in ondemand.TEXT_RUNS)
    assert ondemand.TEXT_ALLOCATION == ["null k=4", "remoe 2", "threshold 2"]
    assert not any(isinstance(r.router, SeqTopK) for r in ondemand.TEXT_RUNS.values())


def test_text_comparisons_read_the_fifths_and_the_loss(text_results):
    from course import text

    judged = ondemand.text_comparisons(text_results)
    n = len(ondemand.TEXT_ALLOCATION)
    assert len(judged) == 2 * n
    for c, run in zip(judged[:n], ondemand.TEXT_ALLOCATION):
        fifths = text.per_seed(text_results, run, "by_quintile")
        assert c.diffs == pytest.approx([f[-1] - f[0] for f in fifths])
        assert c.lower_is_better is None
    for c, run in zip(judged[n:], ondemand.TEXT_ALLOCATION):
        assert (c.a, c.b, c.measure) == (f"{run} on text", "top-2 on text", "loss")
        assert c.diffs == tuple(text_results.differences(run, "top-2", "loss"))


def test_the_family_takes_the_text_comparisons_too(results, text_results):
    alone, both = ondemand.family(results), ondemand.family(results, text_results)
    assert len(both) == len(alone) + 2 * len(ondemand.TEXT_ALLOCATION)
    assert [c.a for c in both[: len(alone)]] == [c.a for c in alone]
    # more comparisons, a wider (or equal) interval for every one of the first
    assert all(b.high - b.low >= a.high - a.low - 1e-12 for a, b in zip(alone, both))

"""Adaptive gating (Li et al., EMNLP 2023): the rule, its balance loss, its cost, its command."""

import inspect
import math
import statistics
from dataclasses import replace

import pytest
import torch

from course import adaptive as ex
from course import harness
from minimoe.analysis import RoutingRecorder
from minimoe.data import PAD_ID, TASKS
from minimoe.dispatch import combine
from minimoe.experts import Experts
from minimoe.layer import MoE, MoEConfig, moe_layers
from minimoe.losses import load_balance_loss, z_loss
from minimoe.routing import Adaptive, adaptive, top_k


def logits_of(rows):
    """Logits whose softmax is each row of ``rows`` (probabilities)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


# ---- the rule, by hand ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "probs, threshold, chosen",
    [
        ([0.40, 0.31, 0.20, 0.09], 0.1, {0, 1}),  # gap 0.09: just inside
        ([0.40, 0.29, 0.20, 0.11], 0.1, {0}),  # gap 0.11: just outside
        ([0.10, 0.30, 0.25, 0.35], 0.1, {3, 1}),  # gap 0.05, top-1 is expert 3
        ([0.10, 0.30, 0.25, 0.35], 0.04, {3}),  # the same token with a tighter threshold
        ([0.25, 0.25, 0.25, 0.25], 0.1, None),  # a tie: gap 0, two experts (which two: topk's)
    ],
)
def test_gap_just_inside_and_just_outside(probs, threshold, chosen):
    r = adaptive(logits_of([probs]), threshold)
    if chosen is None:
        assert r.expert_counts.item() == 2
        return
    assert {e for e in range(4) if r.mask[0, e]} == chosen
    # weights are the softmax values on S (Eq. 3), not renormalized by default
    expected = [probs[e] if e in chosen else 0.0 for e in range(4)]
    assert r.weights[0].tolist() == pytest.approx(expected, abs=1e-6)
    renorm = adaptive(logits_of([probs]), threshold, renormalize=True)
    assert renorm.weights[0].tolist() == pytest.approx(
        [w / sum(expected) for w in expected], abs=1e-6
    )


def test_raw_and_normalized_gaps_decide_differently():
    # p1 - p2 = 0.08 <= 0.1, but (p1 - p2) / (p1 + p2) = 0.08 / 0.52 = 0.154 > 0.1
    logits = logits_of([[0.30, 0.22, 0.18, 0.16, 0.14]])
    assert adaptive(logits, 0.1, gap="raw").expert_counts.item() == 2
    assert adaptive(logits, 0.1, gap="normalized").expert_counts.item() == 1
    assert adaptive(logits, 0.16, gap="normalized").expert_counts.item() == 2  # 0.154 <= 0.16
    # where p1 + p2 = 1 the two gaps are the same number
    both = logits_of([[0.55, 0.45, 0.0 + 1e-12]])
    assert adaptive(both, 0.1, gap="raw").expert_counts.item() == 2
    assert adaptive(both, 0.1, gap="normalized").expert_counts.item() == 2


def test_default_gap_is_raw_and_documented():
    assert inspect.signature(adaptive).parameters["gap"].default == "raw"
    doc = adaptive.__doc__
    assert '``gap="raw"`` (default)' in doc and "normalized" in doc


@pytest.mark.parametrize("num_experts", [1, 2, 3, 8])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("gap", ["raw", "normalized"])
def test_one_or_two_experts_always(num_experts, threshold, gap):
    g = torch.Generator().manual_seed(num_experts)
    logits = 3 * torch.randn(256, num_experts, generator=g)
    logits[:8] = 0.0  # exact ties too
    r = adaptive(logits, threshold, gap=gap)
    assert set(r.expert_counts.unique().tolist()) <= ({1} if num_experts == 1 else {1, 2})
    assert torch.equal((r.probs * r.mask).amax(1), r.probs.amax(1))  # a top-1 expert always kept
    assert torch.equal(r.weights, r.probs * r.mask)


@pytest.mark.parametrize("gap", ["raw", "normalized"])
def test_threshold_0_is_top_1_and_1_is_top_2(gap):
    logits = 2 * torch.randn(512, 8, generator=torch.Generator().manual_seed(3))
    logits[:4] = 0.0  # a tie has gap 0: still top-1 at threshold 0
    assert torch.equal(adaptive(logits, 0.0, gap=gap).mask, top_k(logits, 1).mask)
    assert torch.equal(adaptive(logits, 1.0, gap=gap).mask, top_k(logits, 2).mask)


def test_two_expert_share_grows_with_threshold():
    logits = 2 * torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))
    shares = [
        adaptive(logits, t).expert_counts.float().mean().item() - 1
        for t in (0, 0.05, 0.1, 0.2, 0.3, 1)
    ]
    assert shares == sorted(shares) and shares[0] == 0 and shares[-1] == 1


@pytest.mark.parametrize("threshold", [-0.01, 1.01, float("nan")])
def test_threshold_outside_0_1_is_a_clear_error(threshold):
    with pytest.raises(ValueError, match=r"threshold must be a finite number in \[0, 1\]"):
        adaptive(torch.zeros(2, 4), threshold)


@pytest.mark.parametrize("threshold", [True, "0.1"])
def test_threshold_that_is_not_a_number_is_a_clear_error(threshold):
    with pytest.raises(TypeError, match=r"threshold must be a number"):
        adaptive(torch.zeros(2, 4), threshold)


# ---- the balance loss over top-1 decisions ---------------------------------------------------


def test_balance_loss_counts_top_1_decisions_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    # first choices 0, 0, 1, 0: f = (0.75, 0.25); Q = (0.6, 0.4); L = 2 (0.45 + 0.10) = 1.1
    assert load_balance_loss(probs, count="first").item() == pytest.approx(1.1)
    # counting every selected expert instead (here: both, for every token) gives 2 (0.6 + 0.4) = 2
    assert load_balance_loss(
        probs, torch.ones(4, 2, dtype=torch.bool), count="selected"
    ).item() == pytest.approx(2.0)


def test_adaptive_layer_uses_top_1_balance_with_coefficient_0_01():
    torch.manual_seed(0)
    config = MoEConfig(d_model=8, d_hidden=8, num_experts=4, router=Adaptive(threshold=0.3))
    assert config.balance_counts == "first" and config.balance_coef == 0.01
    layer = MoE(config)
    out = layer(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)))
    r = out.routing
    assert 0 < (r.expert_counts == 2).float().mean() < 1  # some tokens on two experts
    f = torch.bincount(r.probs.argmax(1), minlength=4).float() / 64  # top-1 decisions only
    by_hand = 4 * (f * r.probs.mean(0)).sum()
    torch.testing.assert_close(out.losses["load_balance"], by_hand)
    assert out.losses["load_balance"].item() != pytest.approx(
        load_balance_loss(r.probs, r.mask, "selected").item()
    )
    torch.testing.assert_close(out.aux_loss, 0.01 * by_hand + 1e-3 * z_loss(r.logits))


# ---- fewer pairs, less work ------------------------------------------------------------------


class CountingExperts(Experts):
    """Experts that count the token rows they are given (grouped, or one expert at a time)."""

    rows = 0
    inside = False  # a grouped pass that calls expert() must not count twice

    def grouped(self, x, counts):
        CountingExperts.rows += x.shape[0]
        CountingExperts.inside = True
        try:
            return super().grouped(x, counts)
        finally:
            CountingExperts.inside = False

    def expert(self, e, x):
        if not CountingExperts.inside:
            CountingExperts.rows += x.shape[0]
        return super().expert(e, x)


@pytest.mark.parametrize("path", ["sorted", "loop"])
def test_dispatch_computes_only_the_routed_pairs(path):
    torch.manual_seed(0)
    experts = CountingExperts(num_experts=8, d_model=8, d_hidden=8)
    x = torch.randn(100, 8)
    top2 = top_k(torch.randn(100, 8), 2)
    one = top2.mask & ~(top2.mask & (top2.probs < top2.probs.amax(1, keepdim=True)))  # top-1 only
    mixed = torch.where(torch.arange(100)[:, None] < 20, top2.mask, one)  # 80% of tokens on one
    counts = {}
    for name, mask in {"top-2": top2.mask, "80% top-1": mixed}.items():
        CountingExperts.rows = 0
        combine(x, top2.probs * mask, mask, experts, path=path)
        counts[name] = CountingExperts.rows
    assert counts == {"top-2": 200, "80% top-1": 120}  # 0.6 of the expert FLOPs


def test_time_dispatch_flop_ratios():
    rows = ex.time_dispatch(
        (0.0, 0.2, 0.5), tokens=40, d_model=4, d_hidden=4, num_experts=4, repeats=1
    )
    assert [r["two_expert_share"] for r in rows] == [0.0, 0.2, 0.5, 1.0]
    assert [r["flop_ratio"] for r in rows] == [0.5, 0.6, 0.75, 1.0]
    assert rows[-1]["time_ratio"] == 1.0 and all(r["seconds"] > 0 for r in rows)


# ---- the chapter's experiment ---------------------------------------------------------------

TINY = ex.AdaptiveSetup(
    n_train=64,
    n_val=32,
    max_len=3,
    d_model=16,
    d_hidden=16,
    num_experts=4,
    batch_size=16,
    steps=8,
)


class Tiny(ex.AdaptiveGating):
    eval_every = 4


def test_token_kinds_cover_prompt_answer_end():
    data, _ = ex.make_data(TINY, 0)
    kind = ex.token_kind(data)
    assert torch.equal(kind == ex.TOKEN_KINDS.index("answer"), data.answer_mask)
    assert set(kind.unique().tolist()) == {0, 1, 2}
    assert (kind[:, 0] == ex.TOKEN_KINDS.index("prompt")).all()  # the task token


def test_batches_carry_the_padding_mask_and_padding_is_counted_nowhere():
    exp = Tiny(TINY)
    samples, val = exp.data(0)
    assert torch.equal(samples["mask"], samples["idx"] != PAD_ID)
    assert 0.2 < (~samples["mask"]).float().mean() < 0.6, "padding is a large share"
    model, record = exp.trained("top-2", 0)
    # top-2 sends every real token to two experts: padding counted would not change that, but
    # it would add its FLOPs; per real token they are exactly two experts' in each layer
    per_pair = moe_layers(model)[0].experts.flops_per_assignment()
    assert record["measures"]["experts_per_token"] == 2.0
    assert record["measures"]["flops_per_token"] == 2 * TINY.n_layers * per_pair
    # the held-out share is the real tokens' share: routing every position and keeping the real
    # ones gives the same (attention is causal and padding comes last)
    model, record = exp.trained("adaptive 0.2", 0)
    real = val.inputs != PAD_ID
    with torch.no_grad(), RoutingRecorder(model) as rec:
        model.eval()(val.inputs)
    two = [(rec.routing(i).expert_counts.view(real.shape)[real] > 1).float().mean() for i in (0, 1)]
    assert record["measures"]["two_expert_share"] == pytest.approx(sum(two).item() / 2)
    unmasked = [(rec.routing(i).expert_counts > 1).float().mean() for i in (0, 1)]
    assert record["measures"]["two_expert_share"] != pytest.approx(sum(unmasked).item() / 2)


def test_a_run_records_its_curve_report_and_timing():
    exp = Tiny(TINY)
    r = exp.run_one("adaptive 0.2", 0)
    assert r["curve"]["step"] == [4, 8] and math.isfinite(r["measures"]["loss"])
    assert set(r["measures"]) == {
        "loss",
        "two_expert_share",
        "experts_per_token",
        "flops_per_token",
    }
    extra = r["extra"]
    assert len(extra["per_layer"]) == TINY.n_layers and set(extra["by_task"]) <= set(TASKS)
    assert set(extra["by_kind"]) == set(ex.TOKEN_KINDS)
    share = r["measures"]["two_expert_share"]
    assert statistics.fmean(extra["per_layer"]) == pytest.approx(share)
    assert len(extra["train_two_share"]) == 1  # 8 steps: one window of ex.WINDOW
    assert extra["step_ratio"]["median"] > 0 and len(extra["step_ratio"]["quartiles"]) == 2
    assert "step_ratio" not in exp.run_one("adaptive 0.2", 0, steps=4)["extra"], "cut short"


def test_only_the_curriculum_run_ranks_its_samples():
    exp = Tiny(TINY)
    r = exp.run_one("adaptive 0.1 + curriculum", 0)
    assert exp.sampler.curriculum and r["extra"]["epochs"] == 2  # 8 steps of 16 out of 64
    assert r["extra"]["ranking_seconds"] > 0
    exp.run_one("adaptive 0.1", 0)
    assert not exp.sampler.curriculum and exp.sampler.ranking_seconds == 0
    declared = exp.declared()
    assert declared["adaptive 0.1 + curriculum"]["curriculum"] is True
    assert "curriculum" not in declared["adaptive 0.1"]


def test_threshold_twins_route_top_1_and_top_2():
    exp = Tiny(TINY)
    model, _ = exp.trained("adaptive 0.2", 0, steps=4)
    _, val = exp.data(0)
    top1, top2 = ex.with_threshold(model, 0.0), ex.with_threshold(model, 1.0)
    assert model.config.moe.router == Adaptive(threshold=0.2)  # the original is untouched
    assert top1.config.moe.router == Adaptive(threshold=0.0)
    assert ex.measure(top1, val)["two_expert_share"] == 0.0
    assert ex.measure(top2, val)["two_expert_share"] == 1.0
    assert ex.routing_report(top2, val)["by_kind"] == dict.fromkeys(ex.TOKEN_KINDS, 1.0)
    samples, _ = exp.data(0)
    times = ex.time_train_steps(
        {"a": model, "b": top1}, {k: v[:4] for k, v in samples.items()}, repeats=1
    )
    assert set(times.rounds) == {"a", "b"} and min(times["a"], times["b"]) > 0
    assert times.ratio("a", "a") == 1.0


def test_command_writes_the_harness_format(tmp_path):
    from course.__main__ import main

    argv = "adaptive --steps 4 --n-train 32 --n-val 16 --max-len 2 --d-model 16 --d-hidden 16"
    argv += " --num-experts 4 --batch-size 16 --seeds 0 1 --no-progress --out"
    main([*argv.split(), str(tmp_path), "--runs", "top-2", "adaptive 0.1"])
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "results.csv"}
    setup = ex.AdaptiveSetup(
        steps=4, n_train=32, n_val=16, max_len=2, d_model=16, d_hidden=16, num_experts=4,
        batch_size=16,
    )  # fmt: skip
    results = harness.load(ex.AdaptiveGating(setup), tmp_path / "results.json")
    assert results.seeds == [0, 1] and results.runs == ["top-2", "adaptive 0.1"]
    assert results.values("top-2", "experts_per_token") == [2.0, 2.0]


@pytest.mark.parametrize("name", list(ex.RUNS))
def test_runs_carry_their_papers_losses(name):
    moe = ex.RUNS[name].moe_config(ex.AdaptiveGating(TINY).base_moe())
    z = 1e-3 if name.endswith("z=0.001") else 0.0
    assert (moe.balance_coef, moe.z_coef, moe.balance_counts, moe.capacity_factor) == (
        0.01,
        z,
        "first",
        None,
    )


def test_the_family_pairs_the_cached_runs_by_seed():
    from course import testbed

    results = ex.load()
    testbeds = {mx: testbed.load(mx) for mx in ("equal", "dirichlet")}
    fam = ex.family(results, testbeds)
    assert len(fam) == 13, "chapter 5 and 5b correct these together: their number sets the width"
    loss = [results.values(r, "loss") for r in ("adaptive 0.1", "top-2 raw")]
    c = fam["adaptive 0.1", "top-2 raw", "loss"]
    assert c.diffs == pytest.approx([a - b for a, b in zip(*loss)]) and c.lower_is_better
    share = fam["adaptive 0.1 z=0.001", "adaptive 0.1", "two_expert_share"]
    assert share.lower_is_better is None
    reports = [results.record("adaptive 0.1", s)["extra"] for s in results.seeds]
    by_hand = [r["by_kind"]["answer"] - r["by_kind"]["prompt"] for r in reports]
    assert fam["answer vs prompt"].diffs == pytest.approx(by_hand)
    add = fam["add vs the other tasks"].diffs[0]
    first = reports[0]["by_task"]
    assert add == pytest.approx(
        first["add"] - (first["copy"] + first["reverse"] + first["sort"]) / 3
    )
    tb = fam["dirichlet", "adaptive 0.1", "top-1"]
    assert tb.diffs == pytest.approx(
        testbeds["dirichlet"].differences("adaptive 0.1", "top-1", "rel_error")
    )


@pytest.mark.gpu
def test_the_experiment_runs_on_cuda_as_on_the_cpu(on_cuda_as_on_cpu):
    """The chapters' live cells run it on the device they pick: every tensor where the model is,
    the held-out measures the CPU's up to rounding (routing near-ties may flip a few tokens)."""
    on_cuda_as_on_cpu(Tiny, TINY, "adaptive 0.1")


@pytest.mark.gpu
def test_the_chapters_timings_and_reports_run_on_cuda():
    exp = Tiny(replace(TINY, device="cuda"))
    model, _ = exp.trained("adaptive 0.1", 0)
    _, val = ex.make_data(TINY, 0)
    assert ex.routing_report(model, val)["by_task"].keys() <= set(TASKS)
    samples, _ = exp.data(0)
    models = {"a": model, "top-1": ex.with_threshold(model, 0.0)}
    times = ex.time_train_steps(models, {k: v[:4] for k, v in samples.items()}, repeats=1)
    assert min(times["a"], times["top-1"]) > 0
    rows = ex.time_dispatch(
        (0.0, 0.5), tokens=64, d_model=16, d_hidden=16, num_experts=4, repeats=1, device="cuda"
    )
    assert [r["flop_ratio"] for r in rows] == [0.5, 0.75, 1.0]

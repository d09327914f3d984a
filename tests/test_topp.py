"""Top-P routing (Huang et al. 2024): the rule, its losses in the layer, and chapter 4's experiment."""

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course import harness, topp
from course.harness import Run
from minimoe.analysis import RoutingRecorder
from minimoe.data import TASKS, VOCAB
from minimoe.layer import MoE, MoEConfig
from minimoe.losses import dynamic_loss, load_balance_loss
from minimoe.routing import Adaptive, TopK, TopP, top_p
from minimoe.widgets import top_p_explorer

RULES = ["paper", "code"]


def kept(logits, p, rule="paper", **kw):
    return top_p(torch.tensor(logits, dtype=torch.float32), p, rule=rule, **kw).mask.tolist()


# ---- the rule on hand-worked examples ----------------------------------------------------


# equal logits: every probability is exactly 1/4 (or 1/8) in float32, so cumulative sums hit
# p exactly and the two rules part: "paper" stops at cumsum >= p, "code" at cumsum > p.
# Among equal probabilities the lower expert index comes first (a stable sort).
@pytest.mark.parametrize(
    "experts, p, paper, code",
    [
        (4, 0.25, 1, 2),
        (4, 0.5, 2, 3),
        (4, 0.75, 3, 4),
        (4, 1.0, 4, 4),
        (4, 0.3, 2, 2),
        (4, 0.01, 1, 1),  # no tie: the rules agree
        (8, 0.375, 3, 4),
        (8, 0.4, 4, 4),
        (2, 0.5, 1, 2),
    ],
)
def test_exact_ties_split_the_paper_and_code_rules(experts, p, paper, code):
    logits = [[0.0] * experts]
    assert kept(logits, p, "paper") == [[e < paper for e in range(experts)]]
    assert kept(logits, p, "code") == [[e < code for e in range(experts)]]


def test_hand_worked_without_ties():
    # softmax of [3, 2, 1, 0] = 0.644, 0.237, 0.087, 0.032: cumulative 0.644, 0.881, 0.968, 1
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # expert 3 is the most likely
    probs = [math.exp(v) / sum(math.exp(u) for u in range(4)) for v in range(4)]
    for p, n in [(0.4, 1), (0.6, 1), (0.7, 2), (0.9, 3), (0.97, 4)]:
        for rule in RULES:
            r = top_p(logits, p, rule=rule)
            assert r.mask[0].tolist() == [e >= 4 - n for e in range(4)], (p, rule)
            # the combine weights are the raw probabilities, not renormalized over S
            expected = [probs[e] if e >= 4 - n else 0.0 for e in range(4)]
            torch.testing.assert_close(r.weights[0], torch.tensor(expected), rtol=1e-5, atol=1e-7)


def test_max_experts_caps_and_keeps_the_most_likely():
    logits = [[0.0] * 8]
    assert kept(logits, 0.9, max_experts=3) == [[e < 3 for e in range(8)]]
    assert kept(logits, 0.9, max_experts=20) == kept(logits, 0.9)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"p": 0.0}, "p=0.0"),
        ({"p": -0.1}, "p=-0.1"),
        ({"p": 1.01}, "p=1.01"),
        ({"p": float("nan")}, "p=nan"),
        ({"p": 0.4, "rule": ">="}, "'>='"),
        ({"p": 0.4, "max_experts": 0}, "max_experts=0"),
        ({"p": 0.4, "max_experts": 1.5}, "max_experts=1.5"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, text):
    with pytest.raises((TypeError, ValueError), match=re.escape(text)):  # TypeError: not an int
        top_p(torch.zeros(2, 4), **kwargs)


# ---- properties ------------------------------------------------------------------------

PROPERTY = settings(max_examples=60, deadline=None)


@st.composite
def logits_st(draw):
    tokens, experts = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    # coarse values make exact ties between probabilities (and cumulative sums) frequent
    values = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.0]), st.floats(-8, 8, width=32))
    return torch.tensor(
        draw(
            st.lists(
                st.lists(values, min_size=experts, max_size=experts),
                min_size=tokens,
                max_size=tokens,
            )
        ),
        dtype=torch.float32,
    )


@PROPERTY
@given(logits=logits_st(), p=st.floats(1e-3, 1.0), rule=st.sampled_from(RULES))
def test_minimal_prefix(logits, p, rule):
    """S holds the most likely experts, reaches p, and without its least likely member it does not."""
    r = top_p(logits, p, rule=rule)
    n = r.expert_counts  # (T,)
    sorted_p = r.probs.sort(dim=1, descending=True).values
    cum = sorted_p.cumsum(dim=1)  # (T, E) the same float sums the rule sees
    reaches = (lambda s: s >= p) if rule == "paper" else (lambda s: s > p)
    E = logits.shape[1]
    for t in range(len(logits)):
        k = int(n[t])
        assert 1 <= k <= E
        # the most likely experts (ties broken by index): the k largest probabilities
        assert torch.equal(r.probs[t][r.mask[t]].sort(descending=True).values, sorted_p[t, :k])
        assert reaches(cum[t, k - 1]) or k == E  # enough mass
        assert k == 1 or not reaches(cum[t, k - 2])  # minimal: one fewer falls short
    assert torch.equal(r.weights, r.probs * r.mask)  # raw probabilities


@PROPERTY
@given(
    logits=logits_st(),
    ps=st.lists(st.floats(1e-3, 1.0), min_size=2, max_size=5),
    rule=st.sampled_from(RULES),
)
def test_monotonic_in_p(logits, ps, rule):
    masks = [top_p(logits, p, rule=rule).mask for p in sorted(ps)]
    for small, large in zip(masks, masks[1:]):
        assert not (small & ~large).any()


@PROPERTY
@given(logits=logits_st(), p=st.floats(1e-3, 1.0))
def test_code_rule_keeps_a_superset_and_differs_only_on_ties(logits, p):
    paper, code = top_p(logits, p, rule="paper"), top_p(logits, p, rule="code")
    assert not (paper.mask & ~code.mask).any()
    cum = paper.probs.sort(dim=1, descending=True).values.cumsum(dim=1)
    tie = (cum == p).any(dim=1)  # (T,) some cumulative sum equals p exactly
    assert torch.equal(paper.mask[~tie], code.mask[~tie])


@PROPERTY
@given(logits=logits_st(), rule=st.sampled_from(RULES))
def test_p_1_keeps_enough_experts_to_reach_1(logits, rule):
    r = top_p(logits, 1.0, rule=rule)
    cum = r.probs.sort(dim=1, descending=True).values.cumsum(dim=1)
    reached = cum[torch.arange(len(logits)), r.expert_counts - 1]
    assert ((reached >= 1.0) | (r.expert_counts == logits.shape[1])).all()
    assert ((r.probs * r.mask).sum(dim=1) >= 1 - 1e-5).all()


@PROPERTY
@given(logits=logits_st(), p=st.floats(1e-3, 1.0), cap=st.integers(1, 9))
def test_max_experts_is_a_cap_on_the_same_prefix(logits, p, cap):
    free, capped = top_p(logits, p), top_p(logits, p, max_experts=cap)
    assert torch.equal(capped.expert_counts, free.expert_counts.clamp(max=cap))
    assert not (capped.mask & ~free.mask).any()


# ---- the losses in the layer -------------------------------------------------------------


def test_dynamic_loss_is_the_mean_router_entropy():
    probs = torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert dynamic_loss(probs).item() == pytest.approx(
        (math.log(4) + 0 + math.log(2)) / 3, rel=1e-6
    )


def small_layer(seed=0, **overrides):
    torch.manual_seed(seed)
    return MoE(
        MoEConfig(**{"d_model": 8, "d_hidden": 16, "num_experts": 4, "router": TopP()} | overrides)
    )


def test_layer_reports_each_loss_and_adds_the_papers_coefficients():
    moe = small_layer()
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    out = moe(x)
    p = (x @ moe.gate.weight.detach().T).softmax(dim=-1)  # (T, E) by hand
    assert out.losses["dynamic"].item() == pytest.approx(
        -(p * p.log()).sum(1).mean().item(), rel=1e-5
    )
    # Top-P balance loss: f_i = share of tokens whose S contains i (not normalized)
    f = out.routing.mask.float().mean(0)
    assert out.losses["load_balance"].item() == pytest.approx(
        4 * (f * p.mean(0)).sum().item(), rel=1e-5
    )
    expected = (
        1e-2 * out.losses["load_balance"]
        + 1e-3 * out.losses["z_loss"]
        + 1e-4 * out.losses["dynamic"]
    )
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_selected_balance_loss_grows_with_experts_per_token():
    probs = torch.full((4, 4), 0.25)  # uniform router: L_b = E * sum_i f_i / E = sum_i f_i
    for p, n in [(0.25, 1), (0.5, 2), (1.0, 4)]:
        mask = top_p(probs.log(), p).mask
        assert load_balance_loss(probs, mask, count="selected").item() == pytest.approx(n)


@pytest.mark.parametrize("router, beta", [(TopP(), 1e-4), (TopK(), 0.0), (Adaptive(), 0.0)])
def test_default_dynamic_coefficient_follows_the_paper(router, beta):
    assert MoEConfig(router=router).dynamic_beta == beta
    assert MoEConfig(router=router, dynamic_coef=0.5).dynamic_beta == 0.5
    with pytest.raises(ValueError, match="dynamic_coef=-1"):
        MoEConfig(router=router, dynamic_coef=-1)


def test_gradients_flow_through_the_combine_weights():
    """With every aux loss off, the router's gradient is that of y = sum_{i in S} P_i E_i(x), S fixed."""
    moe = small_layer(balance_coef=0.0, z_coef=0.0, dynamic_coef=0.0)
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    out = moe(x)
    assert out.aux_loss.item() == 0
    out.output.square().sum().backward()
    layer_grad = moe.gate.weight.grad.clone()
    assert layer_grad.abs().sum() > 0

    gate = moe.gate.weight.detach().clone().requires_grad_()
    probs = (x @ gate.T).softmax(dim=-1)  # (T, E)
    with torch.no_grad():
        dense = moe.experts.dense(x)  # (T, E, d)
    y = ((probs * out.routing.mask)[:, :, None] * dense).sum(dim=1)  # (T, d)
    y.square().sum().backward()
    torch.testing.assert_close(layer_grad, gate.grad, rtol=1e-4, atol=1e-6)


def test_a_step_on_the_dynamic_loss_sharpens_the_router():
    moe = small_layer()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    before = moe(x).losses["dynamic"]
    before.backward()
    with torch.no_grad():
        moe.gate.weight -= 0.5 * moe.gate.weight.grad
    assert moe(x).losses["dynamic"] < before


# ---- the experiment (course/topp.py) ------------------------------------------------------

TINY = topp.TopPSetup(
    n_layers=2,
    d_model=16,
    d_hidden=16,
    num_experts=4,
    steps=6,
    batch_size=8,
    n_train=64,
    n_probe=16,
)


class Tiny(topp.TokenTasks):
    eval_every = 3


def test_probe_labels_real_tokens_by_task():
    probe = topp.Probe.make(16, seed=1)
    real = (probe.data.inputs != topp.PAD_ID).reshape(-1)
    assert torch.equal(probe.task >= 0, real)
    assert set(probe.task[real].tolist()) == set(range(len(TASKS)))
    assert sum(n for g, n in probe.counts().items() if g >= 0) == int(real.sum())


def test_the_runs_probe_holds_no_training_sample_and_an_equal_share_per_task():
    setup = topp.TopPSetup(n_train=2048, n_probe=66)
    probe = topp.make_probe(setup, 3)
    seen = {tuple(row) for row in topp.training_data(setup, 3).inputs.tolist()}
    assert not any(tuple(row) in seen for row in probe.data.inputs.tolist())
    assert torch.bincount(probe.data.task, minlength=4).tolist() == [17, 17, 16, 16]
    # the same probe every time, and not the plain stream (which repeats training samples)
    assert torch.equal(topp.make_probe(setup, 3).data.inputs, probe.data.inputs)
    plain = topp.Probe.make(setup.n_probe, seed=4).data.inputs.tolist()
    assert any(tuple(row) in seen for row in plain)
    with pytest.raises(ValueError, match="unseen"):  # a training set that holds the whole pool
        topp.unseen(40, 5, topp.make_multitask(320, max_len=topp.MAX_LEN, seed=5))


def test_real_token_mean_weights_groups_by_their_tokens():
    assert topp.real_token_mean({-1: 8.0, 0: 1.0, 1: 2.0}, {-1: 100, 0: 3, 1: 1}) == pytest.approx(
        1.25
    )


def test_routing_measures_leave_padding_out():
    probe = topp.Probe.make(16, seed=1)
    exp = Tiny(TINY)
    model = exp.model(Run(TopP(p=0.6)).moe_config(exp.base_moe()), 0).eval()
    with torch.no_grad(), RoutingRecorder(model) as rec:
        model(**probe.batch())
    layers = [rec.routing(i) for i in range(len(rec))]
    m = topp.routing_measures(layers, probe)
    real, answers = probe.task >= 0, probe.answer_task == 2  # (N * L,) real tokens; sort's answers
    by_hand = [r.expert_counts[real].float().mean().item() for r in layers]
    assert [m["experts_per_token@layer0"], m["experts_per_token@layer1"]] == pytest.approx(by_hand)
    assert m["experts_per_token"] == pytest.approx(sum(by_hand) / 2)
    sort = [r.expert_counts[answers].float().mean().item() for r in layers]
    assert m["answer_experts_per_token@sort"] == pytest.approx(sum(sort) / 2)
    with_padding = [r.expert_counts.float().mean().item() for r in layers]
    assert with_padding != pytest.approx(by_hand), (
        "(the padding's counts differ: the test can fail)"
    )


def test_task_quality_by_hand():
    probe = topp.Probe.make(8, seed=0)  # two samples per task
    targets = probe.data.targets  # (N, L)
    logits = torch.nn.functional.one_hot(targets.clamp_min(0), len(VOCAB)).float()  # (N, L, V)
    assert set(topp.task_quality(logits, probe).values()) == {1.0}
    row = int((probe.data.task == 2).nonzero()[0])  # a sort problem: one answer token wrong
    pos = int(probe.data.answer_mask[row].nonzero()[0])
    logits[row, pos] = logits[row, pos].roll(1)
    q = topp.task_quality(logits, probe)
    scored = int(probe.data.answer_mask[probe.data.task == 2].sum())
    assert q["exact_match@sort"] == 0.5 and q["token_accuracy@sort"] == pytest.approx(
        1 - 1 / scored
    )
    assert q["exact_match@copy"] == 1.0 and q["exact_match"] == pytest.approx(1 - 0.5 / 4)


def test_a_run_measures_routing_and_quality_on_the_probe():
    exp = Tiny(TINY)
    r = exp.run_one("top-p 0.4", 0)
    assert r["curve"]["step"] == [3, 6]
    m = r["measures"]
    assert m == {k: v[-1] for k, v in r["curve"].items() if k != "step"}, "final = last eval"
    assert list(m)[:4] == ["loss", "experts_per_token", "exact_match", "token_accuracy"]
    assert all(1 <= m[f"experts_per_token@{g}"] <= 4 for g in ("layer0", "layer1", *TASKS))
    assert all(0 <= m[f"{k}@{t}"] <= 1 for k in ("exact_match", "token_accuracy") for t in TASKS)
    extra = r["extra"]
    assert 1 <= extra["experts_per_token_at_0"] <= 4 and extra["final_train_loss"] > 0
    # the final model's per-layer-and-task counts, averaged over layers: the per-task measure
    for t, name in enumerate(TASKS):
        by_layer = [row[t] for row in extra["per_layer_task"]]
        assert sum(by_layer) / 2 == pytest.approx(m[f"experts_per_token@{name}"])
    top2 = exp.run_one("top-2", 0)
    assert top2["measures"]["experts_per_token@layer1"] == 2.0
    assert top2["extra"]["experts_per_token_at_0"] == 2.0


def test_runs_of_a_seed_start_alike_and_a_shorter_run_is_its_prefix():
    exp = Tiny(TINY)
    a, b = (exp.model(exp.runs[n].moe_config(exp.base_moe()), 0) for n in ("top-2", "top-p 0.7"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    full = exp.run_one("top-p 0.4", 0)
    assert Tiny(TINY).run_one("top-p 0.4", 0)["measures"] == full["measures"], "same seed"
    first = exp.run_one("top-p 0.4", 0, steps=3)  # the first half, on the 6-step schedule
    assert first["curve"]["loss"] == full["curve"]["loss"][:1]


def test_within_run_pairs_two_measures_of_one_run_by_seed(tmp_path):
    results = Tiny(TINY).run_all(tmp_path, names=["top-p 0.4"], seeds=[0, 1], progress=False)
    a, b = "experts_per_token@layer0", "experts_per_token@layer1"
    c = topp.within_run(results, "top-p 0.4", a, b, ("layer 0", "layer 1"))
    by_hand = [
        x - y
        for x, y in zip(results.values("top-p 0.4", a), results.values("top-p 0.4", b), strict=True)
    ]
    assert c.diffs == pytest.approx(by_hand) and c.lower_is_better is None
    assert c.drift is not None and c.run_drift is not None
    assert c.measure == "top-p 0.4, experts_per_token" and c.verdict().startswith("layer 0 vs")


def test_the_runs_hold_the_chapters_losses():
    moe = {name: run.moe_config(MoEConfig()) for name, run in topp.RUNS.items()}
    assert all(c.balance_coef == 1e-2 for c in moe.values())
    assert [n for n, c in moe.items() if c.z_coef] == ["top-p 0.4 z=0.001"]
    assert moe["top-p 0.4"].dynamic_beta == 1e-4 and moe["top-2"].dynamic_beta == 0
    assert moe["top-p 0.4 beta=0"].dynamic_beta == 0
    assert moe["top-p 0.4 beta=0.01"].dynamic_beta == 1e-2
    assert moe["top-2 raw"].router == TopK(k=2, renormalize=False)


def test_command_writes_the_harness_format_and_merges_runs(tmp_path):
    from course.__main__ import main

    tiny = [
        *"topp --n-layers 2 --d-model 16 --d-hidden 16 --num-experts 4 --steps 2 --batch-size 4 "
        "--n-train 32 --n-probe 8 --seeds 0 --no-progress --out".split(),
        str(tmp_path),
    ]
    main([*tiny, "--runs", "top-2", "top-p 0.4"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["format"] == harness.FORMAT and saved["experiment"] == "topp"
    assert saved["runs"]["top-p 0.4"]["moe"]["router"]["name"] == "top_p", "the router as data"
    assert [r["run"] for r in saved["results"]] == ["top-2", "top-p 0.4"]
    main([*tiny, "--runs", "top-p 0.2"])  # added, the others kept
    setup = topp.TopPSetup(**{k: v for k, v in saved["setup"].items() if v is not None})
    results = harness.load(topp.TokenTasks(setup), tmp_path / "results.json")
    assert results.runs == ["top-2", "top-p 0.4", "top-p 0.2"]
    assert results.record("top-2", 0) == saved["results"][0]
    assert (tmp_path / "results.csv").read_text().count("\n") == 4


# ---- the explorer ------------------------------------------------------------------------


@pytest.mark.parametrize("with_groups", [False, True])
def test_explorer_draws_for_every_p_and_rule(with_groups, monkeypatch):
    monkeypatch.setattr("matplotlib.pyplot.show", lambda: None)
    logits = [torch.randn(30, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    groups = torch.arange(30) % 4 if with_groups else None
    box = top_p_explorer(logits, groups=groups, group_names=TASKS)
    p_slider, rule = box.children[0].children
    for value in (p_slider.min, 0.4, p_slider.max):
        p_slider.value = value
    rule.value = "code"


# ---- the chapter's family of comparisons -------------------------------------------------


def test_the_family_pairs_the_cached_runs_by_seed():
    results, setup = topp.load(), topp.TopPSetup()
    fam = topp.family(results, setup)
    assert len(fam) == 18, "chapter 4 and 4b correct these together: their number sets the width"
    loss = [results.values(r, "loss") for r in ("top-p 0.4", "top-2")]
    assert fam["loss vs top-2"].diffs == pytest.approx([a - b for a, b in zip(*loss)])
    assert fam["loss vs top-2"].lower_is_better and fam["count vs top-2"].lower_is_better is None
    untrained = [results.record("top-p 0.4", s)["extra"]["experts_per_token_at_0"] for s in [0, 1]]
    at_100 = [results.curve("top-p 0.4", s, "experts_per_token")[100] for s in [0, 1]]
    assert topp.experts_at(results, "top-p 0.4", 0)[:2] == untrained
    assert fam["first 100 steps"].diffs[:2] == pytest.approx(
        [b - a for a, b in zip(untrained, at_100)]
    )
    assert (fam["layers"].a, fam["layers"].b) == ("layer 0", f"layer {setup.n_layers - 1}")
    assert fam["sort vs top-2"].lower_is_better is False  # exact match: higher is better


@pytest.mark.gpu
def test_the_experiment_runs_on_cuda_as_on_the_cpu(on_cuda_as_on_cpu):
    """The chapters' live cells run it on the device they pick: every tensor where the model is,
    the held-out measures the CPU's up to rounding (routing near-ties may flip a few tokens)."""
    on_cuda_as_on_cpu(Tiny, TINY, "top-p 0.4")

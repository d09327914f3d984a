"""Routing functions against hand-worked numbers and the papers' rules."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.routing import (
    Routing,
    adaptive,
    entropy,
    gw_broadcast,
    noisy_top_k,
    normalized_entropy,
    top_gap,
    top_k,
    top_p,
    uncertainty,
)

# Two tokens over four experts; softmax by hand with math.exp.
HAND = [[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 0.0, 2.0]]
HAND_ORDER = [[2, 1, 0, 3], [3, 0, 2, 1]]  # experts by descending logit, read off by eye


def softmax(row):
    z = [math.exp(v) for v in row]
    return [v / sum(z) for v in z]


def logits_of(probs):
    """Logits whose softmax is ``probs`` (rows)."""
    return torch.tensor(probs, dtype=torch.float32).log()


def random_logits(tokens=64, experts=8, seed=0, scale=3.0):
    return scale * torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))


def masked_probs_ok(r):
    """Weights are >= 0 and exactly 0 outside the mask."""
    return bool((r.weights >= 0).all() and (r.weights[~r.mask] == 0).all())


def is_probability_prefix(r):
    """Every kept expert is at least as likely as every expert left out, per token."""
    kept_min = r.probs.masked_fill(~r.mask, float("inf")).min(dim=1).values
    left_max = r.probs.masked_fill(r.mask, float("-inf")).max(dim=1).values
    return bool((kept_min >= left_max).all())


# ---- top-k -----------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False], ids=["mixtral", "raw"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_hand_worked(k, renormalize):
    r = top_k(torch.tensor(HAND), k, renormalize=renormalize)
    for t, row in enumerate(HAND):
        p = softmax(row)
        chosen = HAND_ORDER[t][:k]
        mass = sum(p[e] for e in chosen) if renormalize else 1.0
        assert r.mask[t].tolist() == [e in chosen for e in range(4)]
        assert r.weights[t].tolist() == pytest.approx(
            [p[e] / mass if e in chosen else 0.0 for e in range(4)], abs=1e-6
        )
        assert r.probs[t].tolist() == pytest.approx(p, abs=1e-6)
    assert masked_probs_ok(r)


def test_switch_top_1_weight_is_p_max():
    r = top_k(torch.tensor(HAND), 1, renormalize=False)
    p_max = [max(softmax(row)) for row in HAND]
    assert r.weights.sum(dim=1).tolist() == pytest.approx(p_max, abs=1e-6)
    assert r.weights.sum(dim=1).max() < 1  # not renormalized to 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_top_k_probs_are_float32(dtype):
    r = top_k(torch.tensor(HAND, dtype=dtype), 2)
    assert r.probs.dtype == r.weights.dtype == r.logits.dtype == torch.float32
    assert r.probs.tolist()[0] == pytest.approx(softmax(HAND[0]), abs=1e-2)


# ---- noisy top-k -----------------------------------------------------------------------


def test_noisy_top_k_eval_is_top_k_with_softmax_over_kept():
    logits = torch.tensor(HAND)
    r = noisy_top_k(logits, torch.full_like(logits, 5.0), k=2, training=False)
    assert torch.equal(r.mask, top_k(logits, 2).mask)
    for t, row in enumerate(HAND):
        kept = HAND_ORDER[t][:2]
        z = sum(math.exp(row[e]) for e in kept)
        expected = [math.exp(row[e]) / z if e in kept else 0.0 for e in range(4)]
        assert r.weights[t].tolist() == pytest.approx(expected, abs=1e-6)
    assert r.probs.tolist()[1] == pytest.approx(softmax(HAND[1]), abs=1e-6)


def test_noisy_top_k_training_is_seeded_and_noisy():
    logits = random_logits()
    loud = torch.full_like(logits, 10.0)  # softplus(10) ~ 10: noise dwarfs the logits

    def run(noise_logits, seed=10):  # not random_logits' seed: the noise must be independent
        gen = torch.Generator().manual_seed(seed)
        return noisy_top_k(logits, noise_logits, k=2, training=True, generator=gen)

    a, b = run(loud), run(loud)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.mask, run(loud, seed=11).mask)
    clean = top_k(logits, 2)
    assert not torch.equal(a.mask, clean.mask)
    assert torch.equal(a.probs, logits.softmax(dim=-1))  # probs stay noise-free
    assert (a.expert_counts == 2).all() and masked_probs_ok(a)
    assert torch.allclose(a.weights.sum(dim=1), torch.ones(len(logits)))
    # softplus(-30) ~ 1e-13: the noise vanishes and training routes like evaluation
    assert torch.equal(run(torch.full_like(logits, -30.0)).mask, clean.mask)


@pytest.mark.parametrize("noise_logit", [-2.0, 0.0, 2.0])
def test_noisy_top_k_noise_scale_is_softplus(noise_logit):
    # E = k = 2: weights = softmax(H) over both, so log(w0 / w1) = H0 - H1, and
    # (H0 - H1) - (l0 - l1) = softplus(n) (eps0 - eps1) has standard deviation softplus(n) sqrt 2
    logits = random_logits(tokens=4000, experts=2, seed=5, scale=1.0)
    noise_logits = torch.full_like(logits, noise_logit)
    r = noisy_top_k(logits, noise_logits, k=2, generator=torch.Generator().manual_seed(6))
    noise = (r.weights[:, 0] / r.weights[:, 1]).log() - (logits[:, 0] - logits[:, 1])
    softplus = math.log1p(math.exp(noise_logit))
    assert noise.std().item() / math.sqrt(2) == pytest.approx(softplus, rel=0.05)
    assert abs(noise.mean().item()) < 0.1 * softplus


# ---- top-p -----------------------------------------------------------------------------

# exactly representable probabilities; by descending probability: experts 1, 3, 2, 0 with
# cumulative sums 0.5, 0.75, 0.9375, 1.0 (exact in float32, so ties with p are exact)
DYADIC = [0.0625, 0.5, 0.1875, 0.25]
DYADIC_ORDER = [1, 3, 2, 0]


@pytest.mark.parametrize(
    "p, rule, kept",
    [
        (0.5, "paper", 1),
        (0.5, "code", 2),  # tie: cumsum == p
        (0.75, "paper", 2),
        (0.75, "code", 3),
        (0.9375, "paper", 3),
        (0.9375, "code", 4),
        (0.6, "paper", 2),
        (0.6, "code", 2),  # no tie: the rules agree
        (0.2, "paper", 1),
        (0.2, "code", 1),
        (1e-9, "paper", 1),
        (1e-9, "code", 1),  # at least one expert
        (1.0, "paper", 4),
        (1.0, "code", 4),
    ],
)
def test_top_p_hand_worked(p, rule, kept):
    logits = logits_of([DYADIC])
    assert logits.softmax(dim=-1).tolist() == [DYADIC], "precondition: exact float32 softmax"
    r = top_p(logits, p, rule=rule)
    chosen = DYADIC_ORDER[:kept]
    assert r.mask[0].tolist() == [e in chosen for e in range(4)]
    # raw probabilities, not renormalized
    assert r.weights[0].tolist() == [DYADIC[e] if e in chosen else 0.0 for e in range(4)]


@pytest.mark.parametrize("rule", ["paper", "code"])
def test_top_p_is_monotonic_in_p(rule):
    logits = random_logits(seed=1)
    ps = [0.05 * i for i in range(1, 21)]
    masks = [top_p(logits, p, rule=rule).mask for p in ps]
    for small, large in zip(masks, masks[1:]):
        assert not (small & ~large).any()
    assert masks[0].sum() < masks[-1].sum()


def test_top_p_paper_rule_keeps_no_more_than_code_rule():
    logits = random_logits(seed=2)
    for p in (0.2, 0.4, 0.7):
        paper, code = top_p(logits, p, rule="paper").mask, top_p(logits, p, rule="code").mask
        assert not (paper & ~code).any()


@pytest.mark.parametrize("rule", ["paper", "code"])
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_top_p_1_keeps_all_the_mass(rule, scale):
    r = top_p(random_logits(seed=3, scale=scale), 1.0, rule=rule)
    kept = (r.probs * r.mask).sum(dim=1)
    assert (kept >= 1 - 1e-6).all()


def test_top_p_max_experts_caps():
    logits = random_logits(seed=4, scale=0.5)  # flat routers: top-p wants many experts
    free = top_p(logits, 0.9)
    capped = top_p(logits, 0.9, max_experts=2)
    assert free.expert_counts.max() > 2
    assert torch.equal(capped.expert_counts, free.expert_counts.clamp(max=2))
    assert not (capped.mask & ~free.mask).any()


# ---- adaptive --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probs, two",
    [
        ([0.45, 0.351, 0.1, 0.099], True),  # gap 0.099, just inside 0.1
        ([0.45, 0.349, 0.1, 0.101], False),  # gap 0.101, just outside
        ([0.1, 0.5, 0.05, 0.35], False),  # gap 0.15: top-1 is expert 1
        ([0.1, 0.45, 0.05, 0.4], True),  # gap 0.05: experts 1 and 3
        (DYADIC, True),  # gap 0.5 - 0.25, exactly the threshold 0.25: "within" includes it
    ],
)
def test_adaptive_gap_around_threshold(probs, two):
    threshold = 0.25 if probs == DYADIC else 0.1
    r = adaptive(logits_of([probs]), threshold=threshold)
    first, second = sorted(range(4), key=lambda e: -probs[e])[:2]
    chosen = {first, second} if two else {first}
    assert r.mask[0].tolist() == [e in chosen for e in range(4)]
    expected = [probs[e] if e in chosen else 0.0 for e in range(4)]  # softmax values (Eq. 3)
    assert r.weights[0].tolist() == pytest.approx(expected, abs=1e-6)
    mass = sum(expected)
    renormalized = adaptive(logits_of([probs]), threshold=threshold, renormalize=True)
    assert renormalized.weights[0].tolist() == pytest.approx([w / mass for w in expected], abs=1e-6)


def test_adaptive_raw_and_normalized_gaps_decide_differently():
    # p1 - p2 = 0.05 <= 0.1 but (p1 - p2) / (p1 + p2) = 0.05 / 0.35 = 0.143 > 0.1
    logits = logits_of([[0.2, 0.15, 0.13, 0.12, 0.11, 0.1, 0.1, 0.09]])
    assert adaptive(logits, 0.1, gap="raw").mask[0, :2].tolist() == [True, True]
    assert adaptive(logits, 0.1, gap="normalized").mask[0, :2].tolist() == [True, False]
    # with p1 + p2 = 0.9 the normalized gap 0.05 / 0.9 = 0.056 also passes
    close = logits_of([[0.475, 0.425, 0.05, 0.05]])
    assert adaptive(close, 0.1, gap="normalized").expert_counts.item() == 2


@pytest.mark.parametrize("gap", ["raw", "normalized"])
def test_adaptive_thresholds_0_and_1_are_top_1_and_top_2(gap):
    logits = random_logits(seed=5)
    assert torch.equal(adaptive(logits, 0.0, gap=gap).mask, top_k(logits, 1).mask)
    assert torch.equal(adaptive(logits, 1.0, gap=gap).mask, top_k(logits, 2).mask)


# ---- GW broadcast ----------------------------------------------------------------------


def gw_logits():
    """Tokens 0, 2, 3, 5 nearly uniform (uncertain), 1 and 4 peaked (certain); E = 4."""
    flat, peaked = [0.0, 0.1, -0.1, 0.05], [5.0, 0.0, -1.0, 0.0]
    return torch.tensor([flat, peaked, flat, flat, peaked, flat])


def test_gw_broadcast_uncertain_to_all_certain_unchanged():
    base = top_k(gw_logits(), 1)
    r = gw_broadcast(base, threshold=0.9)
    uncertain = torch.tensor([True, False, True, True, False, True])
    assert torch.equal(r.broadcast, uncertain)
    assert r.mask[uncertain].all()
    assert torch.equal(r.weights[uncertain], base.probs[uncertain])
    assert torch.allclose(r.weights[uncertain].sum(dim=1), torch.ones(4))
    assert torch.equal(r.mask[~uncertain], base.mask[~uncertain])
    assert torch.equal(r.weights[~uncertain], base.weights[~uncertain])
    assert torch.equal(r.probs, base.probs)


def test_gw_broadcast_eval_returns_base_routing():
    base = top_k(gw_logits(), 2)
    assert gw_broadcast(base, threshold=0.0, training=False) is base


@pytest.mark.parametrize(
    "max_slots, seq_len, expected",
    [
        (1, 3, [1, 0, 0, 1, 0, 0]),  # first uncertain token of each sequence of 3
        (2, 3, [1, 0, 1, 1, 0, 1]),
        (0, 3, [0, 0, 0, 0, 0, 0]),
        (1, 2, [1, 0, 1, 0, 0, 1]),  # sequences of 2: [u c] [u u] [c u]
        (2, None, [1, 0, 1, 0, 0, 0]),  # no seq_len: the batch is one sequence
        (None, 3, [1, 0, 1, 1, 0, 1]),  # no cap
    ],
)
def test_gw_broadcast_max_slots_per_sequence(max_slots, seq_len, expected):
    r = gw_broadcast(top_k(gw_logits(), 1), 0.9, max_slots=max_slots, seq_len=seq_len)
    assert r.broadcast.tolist() == [bool(v) for v in expected]
    assert r.expert_counts.tolist() == [4 if v else 1 for v in expected]


def test_gw_broadcast_entropy_threshold_is_in_nats():
    # uniform over 4, 5 and 8 of E = 8 experts: H = ln 4 = 1.386, ln 5 = 1.609, ln 8 = 2.079
    rows = [[0.0] * n + [-1e4] * (8 - n) for n in (4, 5, 8)]
    base = top_k(torch.tensor(rows), 1)
    assert gw_broadcast(base, 1.6, measure="entropy").broadcast.tolist() == [False, True, True]
    assert gw_broadcast(base, 1.8, measure="entropy").broadcast.tolist() == [False, False, True]
    # the same tokens in normalized units: 0.667, 0.774, 1
    assert gw_broadcast(base, 0.7).broadcast.tolist() == [False, True, True]


@pytest.mark.parametrize("measure", ["normalized_entropy", "entropy"])
@pytest.mark.parametrize("num_experts", [2, 8])
def test_gw_broadcast_at_the_maximum_threshold_takes_uniform_tokens(measure, num_experts):
    # H >= threshold with threshold = the measure's maximum: exactly uniform tokens qualify
    upper = 1.0 if measure == "normalized_entropy" else math.log(num_experts)
    base = top_k(torch.zeros(3, num_experts), 1)
    assert gw_broadcast(base, upper, measure=measure).broadcast.all()


# ---- uncertainty measures --------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [2, 3, 8])
def test_uncertainty_measures_at_extremes(num_experts):
    one_hot = torch.eye(num_experts)[:1]
    uniform = torch.full((1, num_experts), 1 / num_experts)
    assert entropy(one_hot).item() == 0
    assert normalized_entropy(one_hot).item() == 0
    assert top_gap(one_hot).item() == 1
    assert entropy(uniform).item() == pytest.approx(math.log(num_experts), abs=1e-6)
    assert normalized_entropy(uniform).item() == pytest.approx(1, abs=1e-6)
    assert top_gap(uniform).item() == 0
    assert uncertainty(uniform, "entropy").item() == pytest.approx(math.log(num_experts), abs=1e-6)


def test_entropy_hand_worked():
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    assert entropy(probs).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert top_gap(probs).item() == 0.25


# ---- properties over random logits -----------------------------------------------------


@st.composite
def logits_st(draw):
    tokens, experts = draw(st.integers(0, 20)), draw(st.integers(1, 10))
    values = st.floats(-30, 30, width=32, allow_nan=False)
    flat = draw(st.lists(values, min_size=tokens * experts, max_size=tokens * experts))
    return torch.tensor(flat, dtype=torch.float32).reshape(tokens, experts)


PROPERTY = settings(max_examples=50, deadline=None)


@PROPERTY
@given(logits=logits_st(), data=st.data())
def test_top_k_properties(logits, data):
    k = data.draw(st.integers(1, logits.shape[1]))
    r = top_k(logits, k)
    assert masked_probs_ok(r) and is_probability_prefix(r)
    assert (r.expert_counts == k).all()
    assert torch.allclose(r.weights.sum(dim=1), torch.ones(len(logits)), atol=1e-5)


@PROPERTY
@given(logits=logits_st(), p=st.floats(0.01, 1.0), rule=st.sampled_from(["paper", "code"]))
def test_top_p_properties(logits, p, rule):
    r = top_p(logits, p, rule=rule)
    assert masked_probs_ok(r) and is_probability_prefix(r)
    assert (r.expert_counts >= 1).all()
    assert torch.equal(r.weights, r.probs * r.mask)
    kept = (r.probs * r.mask).sum(dim=1)
    least = r.probs.masked_fill(~r.mask, float("inf")).min(dim=1).values
    tol = 1e-5
    all_kept = r.expert_counts == logits.shape[1]
    # enough mass, and minimal: without its least likely expert the prefix falls short
    if rule == "paper":
        assert ((kept >= p - tol) | all_kept).all()
        assert ((kept - least < p + tol) | (r.expert_counts == 1)).all()
    else:
        assert ((kept > p - tol) | all_kept).all()
        assert ((kept - least <= p + tol) | (r.expert_counts == 1)).all()


@PROPERTY
@given(logits=logits_st(), threshold=st.floats(0.0, 1.0), renormalize=st.booleans())
def test_adaptive_properties(logits, threshold, renormalize):
    raw = adaptive(logits, threshold, renormalize=renormalize)
    normalized = adaptive(logits, threshold, gap="normalized", renormalize=renormalize)
    for r in (raw, normalized):
        assert masked_probs_ok(r) and is_probability_prefix(r)
        assert ((r.expert_counts >= 1) & (r.expert_counts <= min(2, logits.shape[1]))).all()
    # p1 + p2 <= 1, so the normalized gap is never smaller: it sends fewer tokens to two
    assert not (normalized.mask & ~raw.mask).any()


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, text",
    [
        (lambda: top_k(torch.zeros(2, 4), 0), ValueError, "k=0"),
        (lambda: top_k(torch.zeros(2, 4), 5), ValueError, "k=5"),
        (lambda: top_k(torch.zeros(2, 4), 1.5), TypeError, "1.5"),
        (lambda: top_k(torch.tensor([[0.0, float("nan")]]), 1), ValueError, "nan"),
        (lambda: top_k(torch.tensor([[0.0, float("inf")]]), 1), ValueError, "inf"),
        (lambda: top_k(torch.tensor([[0.0, -float("inf")]]), 1), ValueError, "-inf"),
        (lambda: top_k(torch.zeros(4), 1), ValueError, "(4,)"),
        (lambda: top_k(torch.zeros(2, 3, 4), 1), ValueError, "(2, 3, 4)"),
        (lambda: top_k(torch.zeros(2, 4, dtype=torch.long), 1), TypeError, "torch.int64"),
        (lambda: noisy_top_k(torch.zeros(2, 4), torch.zeros(2, 3)), ValueError, "(2, 3)"),
        (lambda: top_p(torch.zeros(2, 4), 0), ValueError, "p=0"),
        (lambda: top_p(torch.zeros(2, 4), 1.5), ValueError, "p=1.5"),
        (lambda: top_p(torch.zeros(2, 4), 0.5, rule="strict"), ValueError, "'strict'"),
        (lambda: top_p(torch.zeros(2, 4), 0.5, max_experts=0), ValueError, "max_experts=0"),
        (lambda: adaptive(torch.zeros(2, 4), -0.1), ValueError, "-0.1"),
        (lambda: adaptive(torch.zeros(2, 4), 1.5), ValueError, "1.5"),
        (lambda: adaptive(torch.zeros(2, 4), 0.1, gap="ratio"), ValueError, "'ratio'"),
        (lambda: gw_broadcast(top_k(torch.zeros(2, 8)), 1.2), ValueError, "1.2"),
        (lambda: gw_broadcast(top_k(torch.zeros(2, 8)), 3.0, measure="entropy"), ValueError, "3.0"),
        (
            lambda: gw_broadcast(top_k(torch.zeros(2, 8)), 0.5, max_slots=-1),
            ValueError,
            "max_slots=-1",
        ),
        (lambda: gw_broadcast(top_k(torch.zeros(4, 8)), 0.5, seq_len=3), ValueError, "seq_len=3"),
        (lambda: gw_broadcast(top_k(torch.zeros(2, 8)), 0.5, measure="gini"), ValueError, "'gini'"),
        (lambda: uncertainty(torch.zeros(2, 8), "gini"), ValueError, "'gini'"),
    ],
)
def test_bad_input_raises_naming_the_value(call, error, text):
    with pytest.raises(error, match=re.escape(text)):
        call()


def test_cat_takes_the_mask_of_a_part_without_a_base_mask():
    with_base = Routing(
        logits=torch.zeros(2, 3),
        probs=torch.full((2, 3), 1 / 3),
        mask=torch.ones(2, 3, dtype=torch.bool),  # broadcast to every expert...
        weights=torch.full((2, 3), 1 / 3),
        broadcast=torch.tensor([True, False]),
        base_mask=torch.tensor([[True, False, False], [False, True, False]]),  # ...from top-1
    )
    plain = top_k(torch.tensor([[0.0, 0.0, 1.0]]), 1)
    both = Routing.cat([with_base, plain])
    assert both.base_mask.tolist() == [
        [True, False, False],
        [False, True, False],
        [False, False, True],
    ]
    assert both.broadcast.tolist() == [True, False, False]
    assert both.uncertain is None
    assert Routing.cat([plain, plain]).base_mask is None

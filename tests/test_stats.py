"""Paired statistics (course/stats.py) on hand-worked examples."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from course import stats


@pytest.mark.parametrize(
    ("q", "df", "t"),  # from printed t tables
    [
        (0.975, 1, 12.7062),
        (0.975, 2, 4.3027),
        (0.975, 4, 2.7764),
        (0.975, 9, 2.2622),
        (0.995, 4, 4.6041),
    ],
)
def test_t_quantiles_match_the_tables(q, df, t):
    assert stats.t_quantile(q, df) == pytest.approx(t, abs=1e-4)


def test_two_sided_p_of_hand_worked_t():
    assert stats.t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| > 1) = 1/2
    assert stats.t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert stats.t_two_sided_p(2.0, 4) == pytest.approx(0.11612, abs=1e-5)
    assert stats.t_two_sided_p(math.inf, 3) == 0.0


def test_paired_interval_by_hand():
    # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, se 0.01/sqrt(3), t(0.975, 2) = 4.3027
    c = stats.compare([0.11, 0.12, 0.13], [0.10, 0.10, 0.10], ("a", "b"))
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert c.mean == pytest.approx(0.02)
    assert (c.low, c.high) == pytest.approx((0.02 - half, 0.02 + half))
    assert c.p == pytest.approx(stats.t_two_sided_p(0.02 / (0.01 / math.sqrt(3)), 2))
    assert not c.beyond_noise and "within noise" in c.verdict()


def test_verdict_words_follow_the_sign_and_the_direction():
    worse = stats.compare([1.0, 1.1, 0.9, 1.05], [0.0] * 4, ("x", "y"))
    assert worse.beyond_noise and "worse beyond noise" in worse.verdict()
    better = stats.compare([1.0, 1.1, 0.9, 1.05], [0.0] * 4, lower_is_better=False)
    assert "better beyond noise" in better.verdict()


def test_compare_refuses_bad_input():
    with pytest.raises(ValueError, match="one per seed"):
        stats.compare([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stats.compare([1.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        stats.compare([1.0, math.nan], [0.0, 0.0])


def test_holm_by_hand():
    # three comparisons with p = 0.01, 0.02, 0.04 (m = 3): adjusted 0.03, 0.04, 0.04
    fam = [_with_p(0.04), _with_p(0.01), _with_p(0.02)]
    out = stats.holm(fam)
    assert [c.p_holm for c in out] == pytest.approx([0.04, 0.03, 0.04])
    # p = 0.01, 0.03, 0.04: 0.03 > 0.05 / 2 stops the procedure; the last one fails too
    out = stats.holm([_with_p(0.01), _with_p(0.03), _with_p(0.04)])
    assert [c.p_holm for c in out] == pytest.approx([0.03, 0.06, 0.06])


def _with_p(p: float, n: int = 6) -> stats.Comparison:
    """A comparison of n seeds whose t-test gives exactly ``p`` (differences +-1 around t*se)."""
    t = stats.t_quantile(1 - p / 2, n - 1)
    sd = math.sqrt(n / (n - 1))  # of +1 and -1 alternating
    mean = t * sd / math.sqrt(n)
    return stats.compare([mean + (1 if i % 2 else -1) for i in range(n)], [0.0] * n)


@settings(deadline=None)  # a busy machine must not fail it
@given(st.lists(st.floats(0.001, 0.2), min_size=1, max_size=8), st.integers(3, 9))
def test_corrected_intervals_exclude_zero_exactly_when_holm_rejects(ps, n):
    out = stats.holm([_with_p(p, n) for p in ps])
    for c in out:
        if abs(c.p_holm - 0.05) > 1e-6:
            assert c.beyond_noise == (c.p_holm < 0.05)
        assert c.p_holm >= c.p - 1e-12 and c.high - c.low >= 0


def test_holm_widens_the_interval():
    fam = [_with_p(0.01), _with_p(0.2)]
    plain, corrected = fam[0], stats.holm(fam)[0]
    assert corrected.low < plain.low and corrected.high > plain.high
    assert corrected.mean == plain.mean


def test_tail_slope_and_the_settled_rule():
    steps = list(range(0, 1001, 100))
    flat = [1.0] * 11
    falling = [1.0 - 0.001 * s for s in steps]
    assert stats.tail_slope(steps, flat) == 0
    assert stats.tail_slope(steps, falling) == pytest.approx(-0.001)
    assert stats.tail_drift(steps, falling) == pytest.approx(-0.2)  # the last fifth: 200 steps
    gap = stats.compare([0.5, 0.6, 0.55], [0.0] * 3, drift=-0.2)
    assert gap.beyond_noise and gap.settled  # moved 0.2 against a gap of 0.55
    moving = stats.compare([0.5, 0.6, 0.55], [0.0] * 3, drift=-0.3)
    assert not moving.settled and "provisional" in moving.verdict()


def test_runs_still_improving_make_a_verdict_provisional():
    gap = stats.compare([0.5, 0.6, 0.55], [0.0] * 3, drift=0.0, run_drift=-0.6)
    assert gap.beyond_noise and not gap.settled, "each run moved more than the gap judged"
    assert "a run moved -0.6000" in gap.verdict()
    assert stats.compare([0.5, 0.6, 0.55], [0.0] * 3, drift=0.0, run_drift=-0.5).settled


def test_the_last_fifth_is_of_training_not_of_the_curve():
    # a fine-tuning recipe evaluated from step 450 of 600: its last fifth is steps 480-600
    steps, values = [450, 500, 550, 600], [1.0, 0.9, 0.85, 0.8]
    by_hand = -0.001  # least squares through (500, .9), (550, .85), (600, .8)
    assert stats.tail_slope(steps, values) == pytest.approx(by_hand)
    assert stats.tail_drift(steps, values) == pytest.approx(by_hand * 120)


def test_a_quantity_with_no_better_side_is_called_higher_or_lower():
    up = stats.compare([2.0, 2.1, 2.2], [1.0, 1.05, 1.1], ("late", "early"), "experts per token",
                       lower_is_better=None)  # fmt: skip
    assert (
        up.beyond_noise and "late vs early, experts per token: higher beyond noise" in up.verdict()
    )
    down = stats.compare([1.0, 1.05, 1.1], [2.0, 2.1, 2.2], lower_is_better=None)
    assert "lower beyond noise" in down.verdict()
    assert "better" not in up.verdict() + down.verdict()

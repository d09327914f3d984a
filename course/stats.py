"""Paired statistics for the course's verdicts, in one place.

Two runs of one seed share their initial weights and their batches, so most of what differs
between seeds cancels in their difference: every comparison here is of paired differences, one
per seed. ``compare`` gives the mean difference, its t-based 95% interval and the two-sided p;
``holm`` corrects a chapter's family of comparisons for their number (Holm 1979), so that a
chapter that makes ten comparisons does not find one "significant" by chance; ``verdict`` puts
the rule into words. "beyond noise" is said only when the corrected interval excludes 0.

``tail_slope`` is the converged rule's measure: how fast a held-out curve still moves over the
last fifth of training. A gap measured while it still moves that fast against its size is
labelled provisional (``Comparison.settled``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

ALPHA = 0.05  # two-sided: 95% intervals


# ---- Student's t distribution (no SciPy: the course installs none) ------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return f


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile (0.5 < q < 1) of Student's t with ``df`` degrees of freedom."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"q must be in (0.5, 1), got q={q!r}")
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 2 * (1 - q):
        hi *= 2.0
    for _ in range(80):  # bisection: the two-sided p falls as t grows
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 2 * (1 - q) else (lo, mid)
    return (lo + hi) / 2.0


# ---- paired comparisons --------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """``a`` minus ``b`` on ``measure``, one difference per seed.

    ``low``/``high`` bound the interval at confidence ``1 - level`` (0.95 before correction;
    ``holm`` widens it); ``p`` is the t-test's two-sided p and ``p_holm`` the corrected one.
    ``drift`` is how much the gap moved over the last fifth of training and ``run_drift`` the
    larger of how much either run's own measure moved there (None: no curve).
    """

    a: str
    b: str
    measure: str
    diffs: tuple[float, ...]
    mean: float
    low: float
    high: float
    p: float
    level: float = ALPHA
    p_holm: float | None = None
    drift: float | None = None
    run_drift: float | None = None
    lower_is_better: bool | None = True  # None: a quantity with no better side (higher/lower)

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def beyond_noise(self) -> bool:
        """The (corrected) interval excludes 0."""
        return self.low > 0 or self.high < 0

    @property
    def settled(self) -> bool:
        """Measured on runs that have stopped improving: over the last fifth of training each
        run moved less than what is judged (the gap if beyond noise, else the interval's
        half-width), and the gap itself less than half of it. True without curves."""
        judged = abs(self.mean) if self.beyond_noise else (self.high - self.low) / 2
        gap_ok = self.drift is None or abs(self.drift) < 0.5 * judged
        runs_ok = self.run_drift is None or abs(self.run_drift) < judged
        return gap_ok and runs_ok

    def verdict(self) -> str:
        """ "better"/"worse ... beyond noise" or "within noise", with the interval; "provisional"
        where the gap still moves (``settled``)."""
        ci = f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"
        if self.beyond_noise and self.lower_is_better is None:
            word = f"{'lower' if self.mean < 0 else 'higher'} beyond noise"
        elif self.beyond_noise:
            better = (self.mean < 0) == self.lower_is_better
            word = f"{'better' if better else 'worse'} beyond noise"
        else:
            word = "within noise"
        moved = [
            f"{what} moved {value:+.4f}"
            for what, value in (("the gap", self.drift), ("a run", self.run_drift))
            if value is not None
        ]
        tail = "" if self.settled else f"; provisional: over the last fifth {', '.join(moved)}"
        return f"{self.a} vs {self.b}, {self.measure}: {word}, {ci}{tail}"


def compare(
    a: Sequence[float],
    b: Sequence[float],
    names: tuple[str, str] = ("a", "b"),
    measure: str = "loss",
    level: float = ALPHA,
    drift: float | None = None,
    run_drift: float | None = None,
    lower_is_better: bool | None = True,
) -> Comparison:
    """Paired t-test of ``a`` - ``b`` (one value per seed, the seeds in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one per seed in both, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"a paired interval needs at least 2 seeds, got {len(a)}")
    diffs = tuple(float(x) - float(y) for x, y in zip(a, b))
    if not all(math.isfinite(d) for d in diffs):
        raise ValueError(f"differences must be finite, got {diffs}")
    n, mean = len(diffs), statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    if se == 0:  # every seed gave the same difference
        p = 1.0 if mean == 0 else 0.0
        half = 0.0
    else:
        p = t_two_sided_p(mean / se, n - 1)
        half = t_quantile(1 - level / 2, n - 1) * se
    return Comparison(
        names[0], names[1], measure, diffs, mean, mean - half, mean + half, p, level,
        drift=drift, run_drift=run_drift, lower_is_better=lower_is_better,
    )  # fmt: skip


def holm(family: Sequence[Comparison], alpha: float = ALPHA) -> list[Comparison]:
    """The family's comparisons corrected for their number (Holm's step-down), in their order.

    Sorted by p, the r-th smallest (r = 1..m) is tested at alpha / (m - r + 1) until the first
    one that fails; that one and every later one fail. Each comparison's interval is widened to
    the confidence of its step, 1 - alpha / (m - r' + 1) with r' = min(r, the first failing
    rank), so an interval excludes 0 exactly when Holm's adjusted p (``p_holm``) is below alpha.
    """
    m = len(family)
    order = sorted(range(m), key=lambda i: family[i].p)
    out: list[Comparison | None] = [None] * m
    running, failed_at = 0.0, None
    for rank, i in enumerate(order, start=1):
        c = family[i]
        running = max(running, min(1.0, (m - rank + 1) * c.p))  # adjusted p, monotone
        if failed_at is None and running >= alpha:
            failed_at = rank
        step = rank if failed_at is None else failed_at
        level = alpha / (m - step + 1)
        wide = compare(
            list(c.diffs), [0.0] * c.n, (c.a, c.b), c.measure, level, c.drift, c.run_drift,
            c.lower_is_better,
        )  # fmt: skip
        out[i] = replace(wide, p=c.p, p_holm=running)
    return [c for c in out if c is not None]


# ---- converged verdicts --------------------------------------------------------------------


def tail_slope(steps: Sequence[float], values: Sequence[float], fraction: float = 0.2) -> float:
    """Least-squares slope of ``values`` against ``steps`` (training steps, counted from 0) over
    the last ``fraction`` of training, per step; at least the last two points."""
    if len(steps) != len(values) or len(steps) < 2:
        raise ValueError(f"need matching steps and values, at least 2, got {len(steps)}")
    start = (1 - fraction) * steps[-1]
    xs, ys = zip(*[(s, v) for s, v in zip(steps, values) if s >= start])
    if len(xs) < 2:
        xs, ys = tuple(steps[-2:]), tuple(values[-2:])
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def tail_drift(steps: Sequence[float], values: Sequence[float], fraction: float = 0.2) -> float:
    """How much the curve moves over the last ``fraction`` of training, at its tail slope."""
    return tail_slope(steps, values, fraction) * fraction * steps[-1]

"""One set of numbers: every chapter's headline routing numbers, with the setting each came from.

The chapters measure the same routers on different data, models and loss recipes, so the same
quantity differs between them (top-p's experts per token is not the same in chapters 4 and 6).
This table reads every chapter's cached runs (``data/``) and puts each number beside its
setting, so a reader sees which setting moved it. Chapter 6 prints it; the README's
course summary is this table (a test keeps them equal): ``python -m course numbers``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable

from course import (
    adaptive,
    balance,
    balance_scope,
    compare,
    gw,
    harness,
    modern,
    ondemand,
    stats,
    testbed,
    text,
    topp,
)

LM = "Shakespeare bytes, 2-layer LM, 1200 steps (cosine)"
TOKENS = "graded token tasks"
TESTBED = "mixture testbed (equal weights), 1 MoE layer, 4000 steps"
COURSE = "course: balance 1e-2 + z-loss 1e-3"
PAPER = "paper's own (no z-loss)"


def _stats(values: Iterable[float]) -> tuple[float, float, float, int]:
    v = list(values)
    return statistics.fmean(v), min(v), max(v), len(v)


def _row(chapter: str, router: str, quantity: str, values, data: str, recipe: str) -> dict:
    """One number over seeds: its mean and range; a paired difference (`` - `` in its name)
    gets its 95% t-interval instead of the range (uncorrected: each chapter corrects its own
    family of comparisons)."""
    mean, low, high, seeds = _stats(values)
    if " - " in quantity and seeds > 1:
        interval = stats.compare(list(values), [0.0] * seeds)
        low, high = interval.low, interval.high
    return {
        "chapter": chapter,
        "router": router,
        "quantity": quantity,
        "mean": mean,
        "low": low,
        "high": high,
        "seeds": seeds,
        "data": data,
        "recipe": recipe,
    }


def balance_rows() -> list[dict]:
    results = harness.load(balance.Balance())
    data, recipe = (
        f"{LM}, dropless",
        "balance 1e-2, no z-loss",
    )

    def versus(a: str, b: str) -> list[float]:
        return results.differences(a, b, "loss")

    vs = "held-out loss - {} (nats)"
    return [
        _row(
            "1",
            "top-1, no L_b",
            vs.format("with L_b"),
            versus("top-1 no L_b", "top-1"),
            data,
            recipe,
        ),
        _row(
            "1",
            "top-2, no L_b",
            vs.format("with L_b"),
            versus("top-2 no L_b", "top-2"),
            data,
            recipe,
        ),
        _row(
            "1",
            "top-2",
            vs.format("dense FFN, top-2's FLOPs"),
            versus("top-2", "dense, top-2's FLOPs"),
            data,
            recipe,
        ),
        _row(
            "1",
            "top-2",
            vs.format("dense FFN, all experts' parameters"),
            versus("top-2", "dense, all experts' parameters"),
            data,
            recipe,
        ),  # fmt: skip
    ]


def topp_rows() -> list[dict]:
    results = topp.load()
    data = f"{TOKENS} (operands <= 6 digits), 3-layer LM, {results.data['setup']['steps']} steps (cosine)"
    epr, vs = "experts per token", "held-out answer loss - top-2 (nats)"
    return [
        _row("4", "top-p 0.4", epr, results.values("top-p 0.4", "experts_per_token"), data, PAPER),
        _row("4", "top-p 0.4", vs, results.differences("top-p 0.4", "top-2", "loss"), data, PAPER),
        _row(
            "4",
            "top-p 0.4",
            epr,
            results.values("top-p 0.4 z=0.001", "experts_per_token"),
            data,
            COURSE,
        ),
    ]


def adaptive_rows() -> list[dict]:
    results = adaptive.load()
    steps = results.data["setup"]["steps"]
    data = f"{TOKENS} (operands <= 4 digits), 2-layer LM, {steps} steps (cosine), padding masked"
    share, vs_raw = "two-expert share", "held-out loss - top-2 raw (nats)"
    return [
        _row("5", "adaptive 0.1", share, results.values("adaptive 0.1", "two_expert_share"), data, PAPER),
        _row("5", "adaptive 0.1", vs_raw, results.differences("adaptive 0.1", "top-2 raw", "loss"), data, PAPER),
        _row("5", "adaptive 0.1", share, results.values("adaptive 0.1 z=0.001", "two_expert_share"), data, COURSE),
    ]  # fmt: skip


def text_rows() -> list[dict]:
    results = text.load()
    data = f"{LM}, dropless"
    return [
        _row(
            "4-5",
            "top-p 0.4",
            "experts per token",
            results.values("top-p 0.4", "experts_per_token"),
            data,
            PAPER,
        ),
        _row(
            "4-5",
            "adaptive 0.1",
            "two-expert share",
            [v - 1 for v in results.values("adaptive 0.1", "experts_per_token")],
            data,
            PAPER,
        ),
    ]


def compare_rows() -> list[dict]:
    results = compare.load()
    data = f"{LM}, capacity 1.25 in training"
    epr, vs = "experts per token", "val loss - top-2 (nats)"

    def versus(run: str) -> list[float]:
        return results.differences(run, "top-2", "loss")

    return [
        _row("6", "top-p 0.4", epr, results.values("top-p", "experts_per_token"), data, PAPER),
        _row("6", "top-p 0.4", vs, versus("top-p"), data, PAPER),
        _row(
            "6",
            "adaptive 0.1",
            "two-expert share",  # 1 or 2 experts: the share on two is experts per token - 1
            [v - 1 for v in results.values("adaptive", "experts_per_token")],
            data,
            PAPER,
        ),
        _row("6", "adaptive 0.1", vs, versus("adaptive"), data, PAPER),
        _row("6", "top-1", vs, versus("top-1"), data, PAPER),
        _row(
            "6",
            "top-2 + GW FT",
            vs,
            versus("top-2 + GW"),
            data,
            "top-2's; in fine-tuning router frozen, z-loss 0",
        ),
    ]


def testbed_rows() -> list[dict]:
    results = testbed.load()

    overall = results.values  # (run, measure) -> one value per seed, over all test inputs

    def versus(router: str, other: str) -> list[float]:
        return results.differences(router, other, "rel_error")

    vs = "test error - top-2 (share of variance)"
    return [
        _row(
            "4-6",
            "top-p 0.4",
            "experts per token",
            overall("top-p 0.4", "experts_per_token"),
            TESTBED,
            PAPER,
        ),
        _row("4-6", "top-p 0.4", vs, versus("top-p 0.4", "top-2"), TESTBED, PAPER),
        _row(
            "4-6",
            "adaptive 0.1",
            "two-expert share",
            overall("adaptive 0.1", "multi_expert_share"),
            TESTBED,
            PAPER,
        ),
        _row("4-6", "adaptive 0.1", vs, versus("adaptive 0.1", "top-2"), TESTBED, PAPER),
        _row("4-6", "top-1", vs, versus("top-1", "top-2"), TESTBED, PAPER),
    ]


def gw_rows() -> list[dict]:
    results = gw.load()
    setup = gw.GWSetup()
    data = (
        f"Shakespeare bytes, unseen play, {setup.pretrain_steps} pretraining + "
        f"{setup.finetune_steps} fine-tuning steps"
    )
    recipe = "released code's: router frozen, z-loss 0, balance 1e-3"
    rows = []
    for arm, label in (("top-2", "GW FT (top-2)"), ("switch", "GW FT (Switch top-1)")):
        for measure, what in (
            ("loss_all", "held-out loss"),
            ("swap_uncertain", "swap sensitivity of uncertain tokens"),
        ):
            diffs = results.differences(f"{arm} GW", f"{arm} plain", measure)
            rows.append(_row("3", label, f"{what} - plain FT (nats)", diffs, data, recipe))
    return rows


def modern_rows() -> list[dict]:
    results = modern.load()
    data, recipe, vio = f"{LM}, dropless", "as named", "MaxVio_global"
    return [
        _row("8", "aux loss 1e-3", vio, results.values("aux 1e-3", "maxvio_global"), data, recipe),
        _row(
            "8",
            "loss-free u=1e-2",
            vio,
            results.values("loss-free 1e-2", "maxvio_global"),
            data,
            recipe,
        ),
        _row(
            "8",
            "hash (a fixed byte -> experts table)",
            "val loss - loss-free u=1e-2 (nats)",
            results.differences("hash", modern.BASE, "loss"),
            data,
            "hash: none; loss-free: bias u=1e-2",
        ),
    ]


def balance_scope_rows() -> list[dict]:
    results = balance_scope.load()
    data = "Dirichlet testbed served in domains, 2 MoE layers, 4000 steps (cosine)"
    recipe, ref = "top-2, balance 1e-2 (f / k), no z-loss", balance_scope.REFERENCE

    def versus(measure: str) -> list[float]:
        return results.differences("sequence", ref, measure)

    run = "balance loss per sequence"
    return [
        _row("8", run, "specialization - global batch", versus("specialization"), data, recipe),
        _row("8", run, "test error - global batch", versus("rel_error"), data, recipe),
    ]


def ondemand_rows() -> list[dict]:
    results = ondemand.load()
    data = "mixture testbed (drawn weights), 1 MoE layer, 4000 steps"
    epi = "true experts per input"

    def spread(run: str) -> list[float]:  # level 3 minus level 1, per seed
        hard, easy = (results.values(run, f"experts_per_token@{m}") for m in (3, 1))
        return [h - e for h, e in zip(hard, easy)]

    vs = "test error - top-{} (share of variance)"
    rows = [
        _row(
            "9",
            "null experts k=4",
            epi,
            results.values("null k=4", "experts_per_token"),
            data,
            PAPER,
        ),
        _row(
            "9",
            "null experts k=4",
            vs.format(2),
            results.differences("null k=4", "top-2", "rel_error"),
            data,
            PAPER,
        ),
        _row("9", "ReMoE (target 2)", f"{epi}, level 3 - level 1", spread("remoe 2"), data, PAPER),
        _row(
            "9",
            "ReMoE (target 2)",
            vs.format(2),
            results.differences("remoe 2", "top-2", "rel_error"),
            data,
            PAPER,
        ),
        _row(
            "9",
            "SeqTopK K=2 (batch budget)",
            vs.format(2),
            results.differences("seqtopk 2", "top-2", "rel_error"),
            data,
            PAPER,
        ),
    ]
    fifths = text.per_seed(ondemand.load_text(), "remoe 2", "by_quintile")
    rows.append(
        _row(
            "9",
            "ReMoE (target 2)",
            "true experts per token, hardest - easiest fifth",
            [f[-1] - f[0] for f in fifths],
            f"{LM}, dropless",
            PAPER,
        )
    )
    served = results.values(ondemand.SERVED_RUN, ondemand.served(1, "rel_error"))
    trained = results.values("top-1", "rel_error")
    rows.append(
        _row(
            "9",
            "top-2 served at top-1",
            "test error - top-1 trained (share of variance)",
            [a - b for a, b in zip(served, trained)],
            data,
            PAPER,
        )
    )
    return rows


def headline_rows() -> list[dict]:
    """Every chapter's headline numbers, in chapter order."""
    rows = (
        balance_rows()
        + gw_rows()
        + topp_rows()
        + adaptive_rows()
        + testbed_rows()
        + text_rows()
        + compare_rows()
        + modern_rows()
        + balance_scope_rows()
        + ondemand_rows()
    )
    order = {"1": -1, "3": 0, "4": 1, "5": 2, "4-6": 3, "4-5": 4, "6": 5, "8": 6, "9": 7}
    return sorted(rows, key=lambda r: order[r["chapter"]])


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table: the mean over seeds and its range."""
    lines = [
        "| chapter | router | quantity | mean (range over seeds; differences: 95% interval) | data and model | losses |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if " - " in r["quantity"]:
            value = (
                f"{r['mean']:+.3g} [95%: {r['low']:+.3g} to {r['high']:+.3g}, {r['seeds']} seeds]"
            )
        else:
            value = f"{r['mean']:.3g} ({r['low']:.3g} to {r['high']:.3g}, {r['seeds']} seeds)"
        lines.append(
            f"| {r['chapter']} | {r['router']} | {r['quantity']} | {value} | {r['data']} | {r['recipe']} |"
        )
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("numbers", help="every chapter's headline numbers in one Markdown table")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> str:
    table = markdown(headline_rows())
    print(table)
    return table

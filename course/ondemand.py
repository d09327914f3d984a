"""Chapter 9: compute on demand (``python -m course ondemand``): does compute go where it is
needed, and what does it buy against top-k at the same compute?

The known-answer testbed with drawn mixture weights (``testbed.TestbedDirichlet``: its setup,
data, model and per-level measures), so no threshold on the router's probabilities is favoured
by the task's arithmetic. Every router runs at two or more compute levels (mean true experts per
token about 1.5, 2 and 3), each with its paper's losses (``Run(router)``, ``losses="paper"``):

- top-1 (Switch, no renormalization), top-2 and top-3 (Mixtral): the anchors.
- null experts (AdaMoE, arXiv 2406.13233): ``ScoreTopK(k, null_experts=8)``, top-k over the
  E = 8 true experts and 8 that output 0; at uniform use k E / (E + 8) true experts per token
  (k = 3, 4, 6: 1.5, 2, 3).
- zero-computation experts (MoE++ arXiv 2410.07348 / LongCat-Flash): the same with 8 identity
  experts (``identity_experts=8``: they add g x).
- LongCat-Flash's compute target (arXiv 2509.01322): the identity runs' router and weights, the
  compute steered by a selection bias instead of the balance loss over the free experts
  (``ScoreTopK(experts_per_token=K_e, selection_bias=True, bias_rate=LONGCAT_RATE)``: after each
  step b_i += u (K_e / (k E) - T_i / (k T)) on the true experts), K_e = k E / (E + 8) as the
  identity runs' uniform use, and the balance loss over the true experts only.
- ReMoE (arXiv 2412.14711) and expert threshold routing (arXiv 2603.11535) with targets 1.5, 2
  and 3; SeqTopK (arXiv 2511.06494) with K = 1, 2, 3 (its K is an integer; the testbed's input
  is 2-D, so a batch is one sequence, and at evaluation the whole test set is).
- top-p (p = 0.5, 0.6, 0.7) and adaptive gating (threshold 0.3, 0.7) from chapters 4-5: their
  compute is learned, not set; the targets are read off ``data/testbed_dirichlet`` (top-p 0.5
  measured 1.49, 0.7 measured 2.84; 0.6 is between them) or guessed (adaptive 0.1 measured
  1.15, and adaptive never exceeds 2).
- k changed at inference: the top-2 run's final model is also evaluated with top-k' for
  k' = 1, 3, 4 (a copy, ``set_router``; no training), kept in ``extra`` as
  ``served k=<k'>: <measure>``.

Losses: AdaMoE's balance loss runs over all E + m columns, counting the k selected (its code:
Hugging Face's Mixtral loss): ``ScoreTopK(balance_free=True, balance_count="selected")``, at
1e-2 (the spec's paper coefficient; AdaMoE's own is not in the spec). It is what makes a token
pick a null expert about m / (E + m) of the time. The identity-expert runs count their free
experts the same way; MoE++'s own steering (the free experts' terms weighted by tau < 1) is not
run. The LongCat runs steer theirs with the bias alone (u = ``LONGCAT_RATE`` = 0.01, constant,
where the paper decays its own on a schedule it does not give; set before the runs, not tuned:
at k = 4 a true expert with no tokens gains 0.01 / 16 a step, about 0.6 in a thousand steps, ten
times a softmax score over 16 columns; one seed's experts per input was looked at to see the
target reached), and renormalize over every chosen column as the identity runs do (Hugging Face's
LongCat weights are the scores times a scaling factor, not renormalized), so that they differ
from the identity runs only in how the compute is steered: the bias, with the balance loss
(1e-2, counting every selected expert) over the true experts alone. LongCat's own loss balances
groups of experts with the free ones as one more group; here the bias balances the true experts
too. As AdaMoE's code does, the null
runs renormalize the weights over the chosen true experts (``renormalize_over="true"``), so a
token that picks null experts runs fewer experts at full weight; the identity runs renormalize
over every chosen column, identity ones included. The free experts' router weights start at 0 (``MoE.gate_extra``, zero for noisy
top-k's noise logits), so at first a token picks one only where its true logits are below 0:
more true experts than k E / (E + 8) until training moves them. ReMoE's lambda_0 = 1e-8 and
alpha = 1.2 and the threshold's beta = 0.99 are the specs' defaults; the threshold's
expert-choice warm-up is off (its length is not in the spec).

Compute counted: ``experts_per_token`` and ``expert_flops_per_token`` count true experts only.
A null or identity expert is no column of the Routing's mask, so it adds nothing to either; the
identity experts' g x (d multiply-adds per input) and the router's extra columns are not
counted, nor any router. ``expert_flops_per_token`` is ``MoEStats.flops`` over the test inputs
(each (input, true expert) pair costs ``Experts.flops_per_assignment()``; dropless: every pair
is kept), per level the level's true experts per input times that; ``no_expert_share`` is the
share of inputs that reach no true expert (null experts, ReMoE, thresholds, SeqTopK allow it).

The chapter's verdicts (``family``, Holm-corrected together, 35 comparisons; 41 with the
text ones): the testbed's
control first (``CONTROL``: top-1 against top-2 on levels 2 and 3, as chapter 4 asks of the
testbed before it judges a router); ``FAMILY``: each dynamic run against the top-k whose k is its
declared target rounded up (top-2 for a target of 1.5: the claim that less compute matches it),
on held-out ``rel_error``; ``SERVED``: the top-2 model served at k' = 1 and 3 against top-1 and
top-3 trained; ``ALLOCATION``: for each dynamic run at a declared 2 experts per input, its true
experts per input at level 3 minus at level 1 (does compute go where it is needed?). The top-k nearest a run's *measured* compute cannot be
declared before the runs, so the pairing is by declared target, and a run that misses its
target is compared at unmatched compute: read ``experts_per_token`` beside each verdict.

Regenerate (results in ``data/ondemand/``):

    python -m course ondemand --threads 1 --out data/ondemand

26 runs x 5 seeds x 4000 steps: about 10 s a run on one idle core (about 25 minutes in all);
the shipped cache took about an hour on 2 cores shared with three other experiments, the runs
split over two processes and joined with ``harness.merge``, and the three LongCat runs were
added later into the same file (``--runs "longcat k=3" "longcat k=4" "longcat k=6"``).
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import replace

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes

from course import harness, stats, text
from course.harness import Run
from course.testbed import LEVELS, TestbedDirichlet
from minimoe.data import MixtureTask
from minimoe.model import MoERegressor, set_router
from minimoe.routing import Adaptive, ExpertThreshold, ReMoE, ScoreTopK, SeqTopK, TopK, TopP

NUM_EXPERTS = 8  # the testbed's E
EXTRA_EXPERTS = 8  # null or identity experts beside them
STEERED = (1.5, 2.0, 3.0)  # the targets of ReMoE and expert threshold routing
SERVED_RUN, SERVED_KS = "top-2", (1, 3, 4)  # k changed at inference
LONGCAT_RATE = 0.01  # u of LongCat-Flash's compute-target bias update


def _free(k: int, kind: str) -> tuple[Run, float]:
    """Top-k over E true and 8 null or identity experts, AdaMoE's balance loss over all E + 8
    columns (every selected expert counted); at uniform use k E / (E + 8) true experts. Null
    experts renormalize the weights over the chosen true experts (AdaMoE's code), identity
    experts over every chosen column (their weight multiplies x)."""
    free = {f"{kind}_experts": EXTRA_EXPERTS, "balance_free": True, "balance_count": "selected"}
    if kind == "null":  # AdaMoE's code: the weights renormalized over the chosen true experts
        free["renormalize_over"] = "true"
    return Run(ScoreTopK(k=k, **free)), k * NUM_EXPERTS / (NUM_EXPERTS + EXTRA_EXPERTS)


def _longcat(k: int) -> tuple[Run, float]:
    """Top-k over E true and 8 identity experts, the mean true experts per token steered to
    K_e = k E / (E + 8) by LongCat-Flash's bias update; the balance loss over the true experts
    only, counting every selected one (LongCat's counts selections)."""
    target = k * NUM_EXPERTS / (NUM_EXPERTS + EXTRA_EXPERTS)
    steered = ScoreTopK(k=k, identity_experts=EXTRA_EXPERTS, selection_bias=True,
                        bias_rate=LONGCAT_RATE, experts_per_token=target,
                        balance_count="selected")  # fmt: skip
    return Run(steered), target


# name -> (the run, its declared target: mean true experts per token)
DECLARED: dict[str, tuple[Run, float]] = {
    "top-1": (Run(TopK(k=1, renormalize=False)), 1.0),
    "top-2": (Run(TopK(k=2)), 2.0),
    "top-3": (Run(TopK(k=3)), 3.0),
    **{f"null k={k}": _free(k, "null") for k in (3, 4, 6)},
    **{f"identity k={k}": _free(k, "identity") for k in (3, 4, 6)},
    **{f"longcat k={k}": _longcat(k) for k in (3, 4, 6)},
    **{f"remoe {t:g}": (Run(ReMoE(experts_per_token=t)), t) for t in STEERED},
    **{f"threshold {t:g}": (Run(ExpertThreshold(experts_per_token=t)), t) for t in STEERED},
    **{f"seqtopk {k}": (Run(SeqTopK(experts_per_token=k)), float(k)) for k in (1, 2, 3)},
    "top-p 0.5": (Run(TopP(p=0.5)), 1.5),
    "top-p 0.6": (Run(TopP(p=0.6)), 2.0),
    "top-p 0.7": (Run(TopP(p=0.7)), 3.0),
    "adaptive 0.3": (Run(Adaptive(threshold=0.3)), 1.5),
    "adaptive 0.7": (Run(Adaptive(threshold=0.7)), 2.0),
}
RUNS = {name: run for name, (run, _) in DECLARED.items()}
TARGETS = {name: target for name, (_, target) in DECLARED.items()}
ANCHORS = ("top-1", "top-2", "top-3")


def anchor(name: str) -> str:
    """The top-k a run is judged against: k = its declared target, rounded up."""
    return f"top-{math.ceil(TARGETS[name])}"


FAMILY = [(name, anchor(name), "rel_error") for name in RUNS if name not in ANCHORS]
SERVED = [(1, "top-1"), (3, "top-3")]  # top-2 served at k' against top-k' trained
# the testbed's control (course/testbed.py, chapter 4): can it tell routers apart? top-1
# against top-2 on its hard part, levels 2 and 3, where one expert cannot fit a mixture
CONTROL = [("top-1", "top-2", "rel_error@2"), ("top-1", "top-2", "rel_error@3")]
# the runs at a declared 2 experts per input whose count may vary: do they give level 3 more?
ALLOCATION = [n for n in RUNS if n not in ANCHORS and TARGETS[n] == 2.0]


def served(k: int, measure: str) -> str:
    """The name ``extra`` keeps a measure of the top-2 model served at top-``k`` under."""
    return f"served k={k}: {measure}"


@torch.no_grad()
def expert_compute(model: MoERegressor, test: MixtureTask) -> dict[str, float]:
    """Expert FLOPs per input (true experts only, ``MoEStats.flops``) and the share of inputs
    that reach no true expert, over the test set and per level (``@m``)."""
    model.eval()
    out = model(test.x.to(next(model.parameters()).device)).layers[0]
    counts = out.routing.expert_counts.cpu()  # (N,) true experts per input
    per_pair = model.moe.experts.flops_per_assignment()
    measures = {
        "expert_flops_per_token": out.stats.flops.item() / len(test),
        "no_expert_share": (counts == 0).float().mean().item(),
    }
    for m in LEVELS:
        at = test.level == m
        measures[f"expert_flops_per_token@{m}"] = counts[at].float().mean().item() * per_pair
        measures[f"no_expert_share@{m}"] = (counts[at] == 0).float().mean().item()
    return measures


class OnDemand(TestbedDirichlet):
    """Every compute-on-demand router at two or more levels, top-k anchors (chapter 9)."""

    name = "ondemand"
    help = "chapter 9: compute on demand, every dynamic router against top-k on the testbed"
    runs = RUNS

    def evaluate(self, model: MoERegressor, held_out: MixtureTask) -> dict[str, float]:
        return super().evaluate(model, held_out) | expert_compute(model, held_out)

    def extra(self, model, held_out, history, record) -> dict:
        out = super().extra(model, held_out, history, record)
        if self.current is not None and self.current[0] == SERVED_RUN:
            for k in SERVED_KS:
                serving = set_router(copy.deepcopy(model), TopK(k=k, renormalize=True))
                measures = self.evaluate(serving, held_out)
                out |= {served(k, key): value for key, value in measures.items()}
        return out


def allocation(results: harness.Results, run: str) -> stats.Comparison:
    """Does ``run`` give the hardest inputs more true experts than the easiest? Its experts per
    token at level 3 minus at level 1, paired by seed (uncorrected; higher/lower, no better
    side), with the gap's drift over the last fifth of training read off its held-out curve."""
    hard, easy = (f"experts_per_token@{m}" for m in (LEVELS[-1], LEVELS[0]))
    seeds = results.seeds_of(run)
    drifts = []
    for seed in seeds:
        a, b = results.curve(run, seed, hard), results.curve(run, seed, easy)
        if a is None or b is None:  # no curve recorded: no drift to read
            drifts = None
            break
        steps = sorted(a)
        drifts.append(stats.tail_drift(steps, [a[t] - b[t] for t in steps]))
    return stats.compare(
        results.values(run, hard, seeds), results.values(run, easy, seeds),
        (f"{run} at level {LEVELS[-1]}", f"level {LEVELS[0]}"), "experts_per_token",
        drift=None if drifts is None else statistics.fmean(drifts), lower_is_better=None,
    )  # fmt: skip


def family(
    results: harness.Results, text_results: harness.Results | None = None
) -> list[stats.Comparison]:
    """The chapter's verdicts, Holm-corrected together, in this order: ``CONTROL`` (top-1
    against top-2 on the hard part: can the testbed tell routers apart?), ``FAMILY`` (quality against top-k
    at the declared compute), ``SERVED`` (the top-2 model served at other k against top-k
    trained), ``ALLOCATION`` (more experts for the hardest inputs than for the easiest) and,
    given the text results, ``text_comparisons`` (the same on text, and each rule's loss)."""
    trained = [results.compare(a, b, m) for a, b, m in CONTROL + FAMILY]
    serving = []
    for k, top in SERVED:
        seeds = results.seeds_of(SERVED_RUN, top)
        a = results.values(SERVED_RUN, served(k, "rel_error"), seeds)
        b = results.values(top, "rel_error", seeds)
        serving.append(stats.compare(a, b, (f"{SERVED_RUN} served at k={k}", top), "rel_error"))
    allocated = [allocation(results, run) for run in ALLOCATION]
    on_text = [] if text_results is None else text_comparisons(text_results)
    return stats.holm(trained + serving + allocated + on_text)


def summary(results: harness.Results) -> list[dict]:
    """Per run (declared order): its declared target, the mean over seeds of every measure and
    the standard deviation over seeds (``*_std``) of ``rel_error`` and ``experts_per_token``."""
    rows = []
    for run in [n for n in RUNS if n in results.runs]:
        seeds = results.seeds_of(run)
        row = {"run": run, "target": TARGETS[run]}
        for key in results.record(run, seeds[0])["measures"]:
            values = results.values(run, key, seeds)
            row[key] = statistics.fmean(values)
            if key in ("rel_error", "experts_per_token"):
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def plot_pareto(results: harness.Results, ax: Axes | None = None) -> Axes:
    """Held-out error against expert FLOPs per input (means over seeds, bars: one standard
    deviation over seeds), each router's compute levels joined, top-k's line dashed, the top-2
    model served at other k as crosses."""
    ax = ax if ax is not None else plt.subplots(figsize=(7, 4.5), layout="constrained")[1]
    rows = {r["run"]: r for r in summary(results)}
    for router in dict.fromkeys(kind(name) for name in rows):
        names = sorted((n for n in rows if kind(n) == router), key=lambda n: TARGETS[n])
        x = [rows[n]["expert_flops_per_token"] for n in names]
        y = [rows[n]["rel_error"] for n in names]
        err = [rows[n]["rel_error_std"] for n in names]
        style = {"color": "black", "ls": "--", "lw": 2} if router == "top-k" else {}
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, label=router, **style)
    seeds = results.seeds_of(SERVED_RUN)

    def at(k: int, measure: str) -> float:  # the top-2 model served at top-k (2: as trained)
        key = measure if k == 2 else served(k, measure)
        return statistics.fmean(results.values(SERVED_RUN, key, seeds))

    ks = sorted({2, *SERVED_KS})
    xs, ys = [at(k, "expert_flops_per_token") for k in ks], [at(k, "rel_error") for k in ks]
    ax.plot(xs, ys, "x:", color="gray", ms=8, label="top-2 served at k'=1-4")
    ax.set(xlabel="expert FLOPs per input (true experts only)", ylabel="held-out relative error",
           title="Quality against compute (mean over seeds)")  # fmt: skip
    ax.legend(fontsize=7, ncols=2)
    return ax


def plot_allocation(results: harness.Results, names: list[str], ax: Axes | None = None) -> Axes:
    """True experts per input at each level (means over seeds), against the m a level-m input
    needs at most."""
    ax = ax if ax is not None else plt.subplots(figsize=(6, 4), layout="constrained")[1]
    ax.plot(LEVELS, LEVELS, color="lightgray", lw=6, label="its m functions")
    for name in names:
        seeds = results.seeds_of(name)
        y = [
            statistics.fmean(results.values(name, f"experts_per_token@{m}", seeds)) for m in LEVELS
        ]
        style = {"color": "black", "ls": "--"} if name in ANCHORS else {}
        ax.plot(LEVELS, y, marker="o", label=name, **style)
    ax.set(xlabel="level m (functions mixed in the input)", ylabel="true experts per input",
           xticks=LEVELS, title="Where the compute goes")  # fmt: skip
    ax.legend(fontsize=7)
    return ax


def kind(name: str) -> str:
    """A run's router, its compute level dropped: "null k=4" -> "null", "top-2" -> "top-k"."""
    return "top-k" if name in ANCHORS else name.rsplit(" ", 1)[0]


def load(path=None) -> harness.Results:
    """The cached results (``data/ondemand``), checked against the declared runs."""
    return harness.load(OnDemand(), path)


# ---- on text: does compute follow a position's difficulty? ---------------------------------

# the causal rules whose count may vary, at about 2 true experts per token, and top-2 (whose
# per-position loss cuts the held-out positions into difficulty fifths: ``text.Text``)
TEXT_RUNS: dict[str, Run] = {
    "top-2": RUNS["top-2"],
    **{name: RUNS[name] for name in ("null k=4", "remoe 2", "threshold 2")},
}
TEXT_ALLOCATION = [name for name in TEXT_RUNS if name != text.REFERENCE]


class OnDemandText(text.Text):
    """Chapter 9 on text (``python -m course ondemand_text``): chapter 1's byte-level model,
    chapters 4-5's text setup and difficulty fifths (``text.Text``), with the causal rules of
    ``TEXT_ALLOCATION`` beside top-2. SeqTopK is left out: on windows of bytes its budget reads
    later positions of the window (section 6 of the chapter)."""

    name = "ondemand_text"
    help = "chapter 9 on text: null experts, ReMoE, expert thresholds by difficulty fifth"
    runs = TEXT_RUNS


def text_comparisons(results: harness.Results) -> list[stats.Comparison]:
    """Uncorrected: for each rule of ``TEXT_ALLOCATION``, its experts per token on the hardest
    fifth minus the easiest (higher/lower), then its held-out loss against top-2's (named
    "<run> on text" vs "top-2 on text")."""
    out = []
    for run in TEXT_ALLOCATION:
        fifths = text.per_seed(results, run, "by_quintile")
        out.append(
            stats.compare(
                [f[-1] for f in fifths],
                [f[0] for f in fifths],
                (f"{run} on text, hardest fifth", "easiest fifth"),
                "experts_per_token",
                lower_is_better=None,
            )  # fmt: skip
        )
    for run in TEXT_ALLOCATION:  # named "... on text": the testbed's pairs keep their names
        c = results.compare(run, text.REFERENCE, "loss")
        out.append(replace(c, a=f"{run} on text", b=f"{text.REFERENCE} on text"))
    return out


def load_text(path=None) -> harness.Results:
    """The cached text results (``data/ondemand_text``), checked against the declared runs."""
    return harness.load(OnDemandText(), path)


def add_parser(sub) -> None:
    OnDemand().add_parser(sub)
    OnDemandText().add_parser(sub)

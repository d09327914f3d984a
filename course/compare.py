"""Chapter 6: which router? Every router of the course on one model, one data set, one seed set
(``python -m course compare``), on the experiment harness (``course.harness``).

The model is chapter 1's tiny byte-level language model (``course.lm.ByteLM``: for one seed every
run starts from the same weights and sees the same batches; the learning rate decays to zero,
so every run ends where it stops improving). Every run has its paper's losses. Every MoE layer
trains with a capacity factor (1.25: capacity = ceil(1.25 * routed pairs / E) per batch), so
drops are measured, except the ``dropless`` runs and expert choice (its own capacity); the
held-out loss is measured dropless (a capacity at evaluation lets later tokens take earlier
tokens' slots: the notebook shows that leak once), and at the training capacity beside it.
"top-2 + GW" continues top-2 from its step ``steps - finetune_steps`` with chapter 3's GW
fine-tuning (uncertain tokens broadcast, router frozen, z-loss off, a fresh optimizer) on the
batches top-2 sees from there; "top-2 + plain FT" does the same without broadcast, so GW is
compared with both. Each run's final model is timed against a fresh top-2 model, interleaved,
on one training batch (the median ratio over rounds, and its quartiles).
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from torch import nn

from course import harness
from course.harness import Run
from course.lm import ByteLM, LMSetup
from minimoe.data import Batch
from minimoe.layer import MoEConfig, moe_layers
from minimoe.routing import (
    Adaptive,
    ExpertChoice,
    GWBroadcast,
    NoisyTopK,
    SigmoidTopK,
    TopK,
    TopP,
)
from minimoe.train import History

REFERENCE = "top-2"  # differences and ratios are to this run
GW_THRESHOLD = 0.75  # normalized entropy, chapter 3's
TOP2 = TopK(k=2)  # Mixtral: g renormalized over the two
DROPLESS = {"capacity_factor": None}

RUNS: dict[str, Run] = {
    "top-2": Run(TOP2),  # first: the fine-tuning runs continue it
    "top-1": Run(TopK(k=1, renormalize=False)),  # Switch: g = P_max
    "noisy top-2": Run(NoisyTopK(k=2)),
    "top-p": Run(TopP(p=0.4)),  # p and beta = 1e-4: the paper's
    "adaptive": Run(Adaptive(threshold=0.1)),
    "top-2 dropless": Run(TOP2, moe=DROPLESS),
    "top-p dropless": Run(TopP(p=0.4), moe=DROPLESS),
    "adaptive dropless": Run(Adaptive(threshold=0.1), moe=DROPLESS),
    # chapter 3's recipe on top-2's model; the balance loss stays at top-2's 1e-2 (chapter 3
    # keeps the released code's 1e-3), so the two fine-tuning runs differ in the broadcast only
    "top-2 + GW": Run(
        GWBroadcast(TOP2, threshold=GW_THRESHOLD),
        losses="course",
        moe={"z_coef": 0.0},
        train={"freeze_router": True},
        continues="top-2",
    ),
    "top-2 + plain FT": Run(TOP2, train={"freeze_router": True}, continues="top-2"),
    # chapter 8's: DeepSeek-V3's sigmoid scores balanced by a bias (u = 1e-2) with its
    # sequence-wise loss, and expert choice (c = 2, its own capacity); no balance loss
    "sigmoid loss-free": Run(SigmoidTopK(k=2, bias_rate=1e-2)),
    "expert choice": Run(ExpertChoice(2.0), moe=DROPLESS),
}
FINETUNED = [n for n, r in RUNS.items() if r.continues is not None]
# the family of comparisons chapter 6 judges (held-out loss, paired by seed, Holm-corrected)
FAMILY = [(n, REFERENCE, "loss") for n in RUNS if n != REFERENCE] + [
    ("top-p dropless", "top-p", "loss"),
    ("adaptive dropless", "adaptive", "loss"),
    ("top-2 + GW", "top-2 + plain FT", "loss"),
]


@dataclass
class CompareSetup(LMSetup):
    """Chapter 1's language model and schedule, a capacity factor, and the fine-tuned third."""

    capacity_factor: float = 1.25
    finetune_steps: int = 400  # the last steps of "top-2 + GW" and "top-2 + plain FT"


@contextmanager
def dropless(model: nn.Module):
    """Every MoE layer of ``model`` without its capacity limit, inside the block."""
    layers = moe_layers(model)
    kept = [m.config.capacity_factor for m in layers]
    for m in layers:
        m.replace_config(capacity_factor=None)
    try:
        yield model
    finally:
        for m, c in zip(layers, kept):
            m.replace_config(capacity_factor=c)


def _layer_sums(out) -> dict[str, float]:
    """Per forward pass, summed over MoE layers: routed pairs, dropped tokens and pairs, tokens
    over the GW threshold and tokens GW broadcast (after its slot cap), FLOPs."""
    tokens = out.layers[0].routing.num_tokens
    return {
        "pairs": sum(m.stats.experts_per_token.item() * tokens for m in out.layers),
        "dropped_tokens": sum(m.stats.dropped_tokens.item() for m in out.layers),
        "dropped_pairs": sum(m.stats.dropped_pairs.item() for m in out.layers),
        "uncertain": sum(m.stats.uncertain_ratio.item() * tokens for m in out.layers),
        "broadcast": sum(m.stats.broadcast_ratio.item() * tokens for m in out.layers),
        "flops": sum(m.stats.flops.item() for m in out.layers),
    }


def _rates(sums: dict[str, float], tokens: int, layers: int) -> dict[str, float]:
    """Totals -> per token: experts per token, dropped, GW-uncertain and GW-broadcast tokens per
    (token, layer), dropped pairs per routed pair, expert FLOPs per token (all layers)."""
    return {
        "experts_per_token": sums["pairs"] / (tokens * layers),
        "uncertain": sums["uncertain"] / (tokens * layers),
        "broadcast": sums["broadcast"] / (tokens * layers),
        "flops_per_token": sums["flops"] / tokens,
        "dropped_tokens": sums["dropped_tokens"] / (tokens * layers),
        "dropped_pairs": sums["dropped_pairs"] / max(sums["pairs"], 1),
    }


def _pass(model: nn.Module, batches: list[Batch]) -> dict[str, float]:
    """One pass over the held-out batches: loss, accuracy, the rates of ``_rates`` and the load
    imbalance (max / mean routed pairs per expert, mean over layers)."""
    device = next(model.parameters()).device
    loss = correct = tokens = 0.0
    sums: dict[str, float] = {}
    load = None
    for b in batches:
        out = model(**{k: v.to(device) for k, v in b.items()})
        n = b["targets"].numel()
        loss += out.loss.item() * n
        correct += (out.logits.argmax(-1).cpu() == b["targets"].cpu()).sum().item()
        tokens += n
        sums = {k: sums.get(k, 0.0) + v for k, v in _layer_sums(out).items()}
        per_layer = torch.stack([m.routing.mask.sum(0).float() for m in out.layers])
        load = per_layer if load is None else load + per_layer  # (layers, E)
    imbalance = statistics.fmean((row.max() / row.mean()).item() for row in load)
    rates = _rates(sums, int(tokens), len(out.layers))
    return {
        "loss": loss / tokens,
        "accuracy": correct / tokens,
        "load_imbalance": imbalance,
    } | rates


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> dict[str, float]:
    """Held-out loss (nats per byte) and next-byte accuracy, dropless, with the routing of the
    same pass: experts per token, expert FLOPs per token and the load imbalance (routed pairs
    per expert, over all held-out tokens); and at the model's training capacity, in batches of
    the training size: ``loss_at_capacity`` and the shares of dropped tokens (per token and
    layer) and of dropped pairs (per routed pair)."""
    model.eval()
    with dropless(model):
        free = _pass(model, batches)
    capped = _pass(model, batches)
    keep = ("loss", "accuracy", "experts_per_token", "flops_per_token", "load_imbalance")
    return {k: free[k] for k in keep} | {
        "loss_at_capacity": capped["loss"],
        "dropped_tokens": capped["dropped_tokens"],
        "dropped_pairs": capped["dropped_pairs"],
    }


@dataclass
class TrainRecord:
    """Training callback: per step, the rates of ``_rates`` on the training batch."""

    steps: list[dict[str, float]] = field(default_factory=list)

    def __call__(self, step: int, model: nn.Module, out) -> None:
        tokens = out.layers[0].routing.num_tokens
        self.steps.append(_rates(_layer_sums(out), tokens, len(out.layers)))

    def means(self, upto: int | None = None) -> dict[str, float]:
        """The mean of every rate over the first ``upto`` steps (all by default)."""
        steps = self.steps[:upto]
        return {k: statistics.fmean(s[k] for s in steps) for k in steps[0]}


class Compare(ByteLM):
    name = "compare"
    help = "chapter 6: every router on one model and data set (quality, FLOPs, time, drops)"
    setup_class = CompareSetup
    runs = RUNS

    def base_moe(self) -> MoEConfig:
        s = self.setup
        return MoEConfig(
            d_model=s.d_model,
            d_hidden=s.d_hidden,
            num_experts=s.num_experts,
            capacity_factor=s.capacity_factor,
        )

    def evaluate(self, model: nn.Module, held_out: list[Batch]) -> dict[str, float]:
        return evaluate(model, held_out)

    def recorder(self, name: str) -> TrainRecord:
        return TrainRecord()

    def extra(self, model: nn.Module, held_out, history: History, record: TrainRecord) -> dict:
        """The training means of the routing rates (over the run's own steps, and for the run
        that others continue, over its steps before they branch), and the final model's
        training-step and inference time relative to a fresh top-2 model's (the median ratio
        over interleaved rounds, and its quartiles)."""
        name = self.current[0]
        extra = {"train": record.means()}
        if any(r.continues == name for r in self.runs.values()):
            extra["train_before_branch"] = record.means(self.continue_at())
        return extra | self.time_against(model, REFERENCE)


# ---- the table over seeds -----------------------------------------------------------------------


def load(path=None) -> harness.Results:
    """The cached comparison (data/compare/), checked against the declared runs."""
    return harness.load(Compare(), path)


def summary(results: harness.Results, setup: CompareSetup | None = None) -> list[dict]:
    """One row per run (declared order): the mean over seeds of every measure; ``loss_vs_top2``
    (the mean paired difference) and its standard deviation over seeds; FLOPs and times relative
    to top-2 (``*_ratio``); the training means (``train_*``) over the whole recipe: for a
    fine-tuned run, top-2's steps before the branch and then its own; ``uncertain_share`` and
    ``broadcast_share``: its own steps."""
    setup = setup or CompareSetup()
    steps, branch = setup.steps, setup.steps - setup.finetune_steps
    seeds = results.seeds_of(REFERENCE)

    def mean(run: str, get) -> float:
        return statistics.fmean(get(results.record(run, s)) for s in results.seeds_of(run))

    def train_mean(run: str, key: str) -> float:
        own = mean(run, lambda r: r["extra"]["train"][key])
        source = RUNS[run].continues
        if source is None:
            return own
        before = mean(source, lambda r: r["extra"]["train_before_branch"][key])
        return (branch * before + (steps - branch) * own) / steps

    ref_flops = mean(REFERENCE, lambda r: r["measures"]["flops_per_token"])
    ref_train_flops = train_mean(REFERENCE, "flops_per_token")
    rows = []
    for run in [n for n in RUNS if n in results.runs]:
        measures = results.record(run, seeds[0])["measures"]
        row = {"run": run, **{k: mean(run, lambda r, k=k: r["measures"][k]) for k in measures}}
        diffs = results.differences(run, REFERENCE, "loss")
        step_ratio = mean(run, lambda r: r["extra"]["step_ratio"]["median"])
        fine_tuned = RUNS[run].continues is not None
        row |= {
            "loss_vs_top2": statistics.fmean(diffs),
            "loss_vs_top2_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "flops_ratio": row["flops_per_token"] / ref_flops,
            "train_experts_per_token": train_mean(run, "experts_per_token"),
            "train_flops_ratio": train_mean(run, "flops_per_token") / ref_train_flops,
            "train_dropped_tokens": train_mean(run, "dropped_tokens"),
            "uncertain_share": mean(run, lambda r: r["extra"]["train"]["uncertain"]),
            "broadcast_share": mean(run, lambda r: r["extra"]["train"]["broadcast"]),
            "step_ratio": step_ratio,
            "train_step_ratio": (branch + (steps - branch) * step_ratio) / steps
            if fine_tuned
            else step_ratio,
            "inference_ratio": mean(run, lambda r: r["extra"]["inference_ratio"]["median"]),
        }
        rows.append(row)
    return rows


# ---- the Pareto front, the pictures ---------------------------------------------------------


def pareto_front(costs: list[float], losses: list[float]) -> list[bool]:
    """True for each point no other point dominates (cost <= and loss <=, one of them <)."""
    points = list(zip(costs, losses))
    return [
        not any(c <= ci and v <= vi and (c, v) != (ci, vi) for c, v in points) for ci, vi in points
    ]


COSTS = {
    "flops_ratio": "inference expert FLOPs / top-2",
    "train_flops_ratio": "training expert FLOPs / top-2",
    "train_step_ratio": "training time / top-2 (whole recipe)",
    "inference_ratio": "inference time / top-2",
}


def _run_colors(summary: list[dict]) -> dict[str, tuple]:
    """One colour per run, none repeated (matplotlib's default cycle has ten)."""
    cmap = plt.get_cmap("tab20")
    return {r["run"]: cmap(i % 20) for i, r in enumerate(summary)}


def _error_bars(rows: list[dict], intervals: dict | None) -> list[list[list[float]]]:
    """Per run, [[below], [above]] its mean: the corrected interval of its paired difference to
    top-2 (``intervals``: run -> ``stats.Comparison``; top-2 itself none), else the std over
    seeds both ways."""
    bars = []
    for r in rows:
        c = None if intervals is None else intervals.get(r["run"])
        if intervals is None:
            below = above = r["loss_vs_top2_std"]
        else:
            below, above = (0.0, 0.0) if c is None else (c.mean - c.low, c.high - c.mean)
        bars.append([[below], [above]])
    return bars


def plot_pareto(
    summary: list[dict],
    cost: str = "flops_ratio",
    ax: Axes | None = None,
    near: float = 0.05,
    intervals: dict | None = None,
) -> Axes:
    """Held-out loss (mean; error bar: the paired difference to top-2's corrected interval
    from ``intervals``, run -> ``stats.Comparison``, else its std over seeds) against a cost
    relative to top-2; the Pareto front is the dashed line. Runs are named beside their
    points, except those within ``near`` of top-2's cost, which crowd there: ``plot_near_top2``
    draws them apart."""
    ax = ax if ax is not None else plt.subplots(figsize=(5.5, 4), layout="constrained")[1]
    x, y = [r[cost] for r in summary], [r["loss"] for r in summary]
    front = pareto_front(x, y)
    colors = _run_colors(summary)
    crowd = [r["run"] for r in summary if abs(r[cost] - 1) <= near]
    named = sorted((x[i], r["run"]) for i, r in enumerate(summary) if r["run"] not in crowd)
    above = {run: j % 2 == 0 for j, (_, run) in enumerate(named)}  # neighbours: above, below
    bars = _error_bars(summary, intervals)
    for i, r in enumerate(summary):
        ax.errorbar(
            x[i],
            y[i],
            yerr=bars[i],
            fmt="o" if front[i] else "s",
            capsize=3,
            color=colors[r["run"]],
            mfc=None if front[i] else "none",
        )
        if r["run"] not in crowd:
            offset = (6, 4) if above[r["run"]] else (6, -11)
            ax.annotate(
                r["run"], (x[i], y[i]), xytext=offset, textcoords="offset points", fontsize=8
            )
    on = sorted((x[i], y[i]) for i in range(len(x)) if front[i])
    ax.plot(*zip(*on), "k--", lw=1, label="Pareto front (filled points: on it)")
    if crowd:
        ax.axvspan(1 - near, 1 + near, color="0.9", zorder=0, label=f"{len(crowd)} runs near top-2")
    ax.set(
        xlabel=COSTS.get(cost, cost),
        ylabel="held-out loss (nats/byte)",
        title="Quality vs compute (lower left is better)",
    )
    ax.legend(fontsize=8)
    return ax


def plot_near_top2(
    summary: list[dict],
    cost: str = "flops_ratio",
    ax: Axes | None = None,
    near: float = 0.05,
    intervals: dict | None = None,
) -> Axes:
    """The runs within ``near`` of top-2's cost, one row each: loss minus top-2's (the mean
    paired difference, and its corrected interval from ``intervals`` or else its std over
    seeds), so the crowd of ``plot_pareto`` can be read."""
    ax = ax if ax is not None else plt.subplots(figsize=(5.5, 4), layout="constrained")[1]
    colors = _run_colors(summary)
    rows = [r for r in summary if abs(r[cost] - 1) <= near]
    for i, (r, xerr) in enumerate(zip(rows, _error_bars(rows, intervals))):
        ax.errorbar(r["loss_vs_top2"], i, xerr=xerr, fmt="o", capsize=3, color=colors[r["run"]])
    ax.axvline(0, color="k", lw=1)
    ax.set(
        yticks=range(len(rows)),
        yticklabels=[f"{r['run']} ({r[cost]:.2f}x)" for r in rows],
        xlabel="held-out loss - top-2's (nats/byte), paired by seed",
        title=f"Runs within {near:.0%} of top-2's {COSTS.get(cost, cost).split(' / ')[0]}",
    )
    ax.invert_yaxis()
    return ax


def print_table(summary: list[dict]) -> None:
    """The table, rounded: ratios are to top-2 (cached timings: a median of ratios measured on
    a shared machine, to read with their noise); dropped tokens and pairs at the training
    capacity on the held-out windows. MaxVio is MaxVio_global (Wang et al. 2024) on the
    held-out windows, load_imbalance - 1, mean over layers: 0 when every expert gets the same
    number of pairs."""
    print(
        f"{'run':>18} {'loss':>6} {'vs top-2':>15} {'exp/tok':>7} {'FLOPs':>5} {'train t':>7} "
        f"{'infer t':>7} {'MaxVio':>6} {'drop tok':>8} {'drop pair':>9}"
    )
    for r in summary:
        print(
            f"{r['run']:>18} {r['loss']:>6.3f} {r['loss_vs_top2']:>+7.3f} ± {r['loss_vs_top2_std']:.3f} "
            f"{r['experts_per_token']:>7.2f} {r['flops_ratio']:>5.2f} {r['train_step_ratio']:>7.2f} "
            f"{r['inference_ratio']:>7.2f} {r['load_imbalance'] - 1:>6.2f} {r['dropped_tokens']:>8.2%} "
            f"{r['dropped_pairs']:>9.2%}"
        )


def add_parser(sub) -> None:
    Compare().add_parser(sub)

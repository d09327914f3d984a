"""Chapter 6: which router? Every router of the course on one model, one data set, one seed set
(``python -m course compare``).

The model is a tiny byte-level MoE language model, the data set the course's text (``load_text()``,
the last 10% held out, ``byte_corpus``). For every seed all runs start from the same weights and see the
same batches in the same order; only the routing changes. Every layer has a capacity factor
(1.25 by default: capacity = ceil(1.25 * routed pairs / E) per batch, in training and in
evaluation), so dropped tokens are measured; top-2, top-p and adaptive also run dropless
(adaptive gating's paper sets no capacity limit). "top-2 + GW" is top-2 for ``steps - finetune_steps`` steps, then
``finetune_steps`` steps of GW fine-tuning (chapter 3's recipe: uncertain tokens broadcast,
router frozen, z-loss off, a fresh optimizer) on the same batches that top-2 sees in its last
steps; "top-2 + plain FT" is the same with no broadcast, so GW is compared with both.
Wall-clock is measured with the runs interleaved and given relative to top-2 (the median over
rounds of the two step times' ratio in the same round).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from torch import nn

from course import common, harness
from course.adaptive import time_train_steps
from course.common import (
    DistinctSeeds,
    Timings,
    add_experiment_args,
    add_setup_args,
    load_json,
    seed_means,
    set_threads,
    setup_from_args,
    write_seed_results,
)
from course.gw import eval_batch, inference_cost, recipes
from minimoe.analysis import RoutingRecorder, load_imbalance
from minimoe.cli import non_negative_int, positive_int
from minimoe.data import BYTE_VOCAB_SIZE, Batch, ByteCorpus, byte_corpus, lm_batches
from minimoe.model import TinyTransformer
from minimoe.routing import Adaptive, ExpertChoice, NoisyTopK, SigmoidTopK, TopK, TopP
from minimoe.train import History, TrainConfig, train
from minimoe.uncertainty import GWFineTuning

REFERENCE = "top-2"  # ratios are to this run

# the runs trained from scratch: name -> MoEConfig fields
ROUTERS: dict[str, dict] = {
    "top-1": {"router": TopK(k=1, renormalize=False)},  # Switch: g = P_max
    "top-2": {"router": TopK(k=2)},  # Mixtral: g renormalized over the two
    "noisy top-2": {"router": NoisyTopK(k=2)},
    "top-p": {"router": TopP(p=0.4)},  # p and beta = 1e-4: the paper's
    "adaptive": {"router": Adaptive(threshold=0.1)},
}
ROUTERS |= {
    f"{n} dropless": ROUTERS[n] | {"capacity_factor": None} for n in ("top-2", "top-p", "adaptive")
}
# chapter 8's routers: DeepSeek-V3's sigmoid scores balanced by a bias (u = 1e-2: chapter 8's
# rate for 600 steps), and expert choice (c = 2, its own capacity); neither uses a balance loss
ROUTERS |= {
    "sigmoid loss-free": {"router": SigmoidTopK(k=2, bias_rate=1e-2), "balance_coef": 0.0},
    "expert choice": {"router": ExpertChoice(2.0), "balance_coef": 0.0, "capacity_factor": None},
}
FINETUNED = {"top-2 + GW": "gw_uncertain", "top-2 + plain FT": "plain"}  # names in gw.recipes()


@dataclass
class Setup(common.Setup):
    """The scale of one comparison (the defaults: the chapter's, under a minute per run on one core)."""

    block_size: int = 32
    finetune_steps: int = 200  # the last steps of "top-2 + GW" and "top-2 + plain FT"
    capacity_factor: float = 1.25
    gw_threshold: float = 0.75  # normalized entropy, chapter 3's
    eval_every: int = 50
    eval_windows: int = 512  # held-out windows of block_size bytes, scored in batches of batch_size


def build_model(setup: Setup, **moe) -> TinyTransformer:
    """A model with the seed's initial weights, the same for every router (noisy top-k's extra
    noise projection, ``gate_extra``, starts at zero, as the layer initializes it); ``moe``:
    MoEConfig fields (a run of ``ROUTERS``), the capacity factor the setup's unless given."""

    def config(**moe):
        return setup.model_config(
            BYTE_VOCAB_SIZE, setup.block_size, **({"capacity_factor": setup.capacity_factor} | moe)
        )

    torch.manual_seed(setup.seed)
    init = TinyTransformer(config()).state_dict()
    model = TinyTransformer(config(**moe))
    missing, unexpected = model.load_state_dict(init, strict=False)
    assert not unexpected and all(
        k.endswith(("gate_extra.weight", "router_state.bias")) for k in missing
    ), (
        missing,
        unexpected,
    )
    return model.to(setup.device)


class BatchStream:
    """Training batches from the stream's own generator (the trainer's is ignored), so a run
    that stops and one that goes on (``fork``) see the same batches."""

    def __init__(self, corpus: ByteCorpus, setup: Setup):
        self.sample = lm_batches(corpus, setup.batch_size, setup.block_size)
        self.generator = torch.Generator().manual_seed(setup.seed)

    def __call__(self, _: torch.Generator) -> Batch:
        return self.sample(self.generator)

    def fork(self) -> BatchStream:
        twin = copy.copy(self)
        twin.generator = torch.Generator().set_state(self.generator.get_state())
        return twin


def eval_batches(corpus: ByteCorpus, setup: Setup) -> list[Batch]:
    """The first ``eval_windows`` consecutive held-out windows, in training-size batches (the
    capacity is per batch, as in training)."""
    batch = eval_batch(corpus, setup.block_size, setup.eval_windows)
    return [dict(zip(batch, b)) for b in zip(*(v.split(setup.batch_size) for v in batch.values()))]


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


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> dict[str, float]:
    """Held-out loss (nats per byte) and next-byte accuracy, with the routing measured on the
    same pass: experts per token (routed, before capacity), expert FLOPs per token (kept pairs,
    from MoEStats.flops), load imbalance (max / mean load per layer, mean over layers) and the
    share of dropped tokens (per token and layer) and pairs."""
    model.eval()
    device = next(model.parameters()).device
    loss = correct = tokens = 0.0
    sums: dict[str, float] = {}
    with RoutingRecorder(model) as rec:
        for b in batches:
            out = model(**{k: v.to(device) for k, v in b.items()})
            n = b["targets"].numel()
            loss += out.loss.item() * n
            correct += (out.logits.argmax(-1).cpu() == b["targets"]).sum().item()
            tokens += n
            sums = {k: sums.get(k, 0.0) + v for k, v in _layer_sums(out).items()}
    imbalance = statistics.fmean(load_imbalance(rec.routing(i)) for i in range(len(rec)))
    return {
        "loss": loss / tokens,
        "accuracy": correct / tokens,
        "load_imbalance": imbalance,
        **_rates(sums, int(tokens), len(rec)),
    }


@dataclass
class TrainRecord:
    """Training callback: per step, the rates of ``_rates`` on the training batch; and, at step
    ``snapshot_at``, a copy of the model and of the batch stream (for fine-tuning from there)."""

    stream: BatchStream
    snapshot_at: int | None = None
    steps: list[dict[str, float]] = field(default_factory=list)
    snapshot: tuple[nn.Module, BatchStream] | None = None

    def __call__(self, step: int, model: nn.Module, out) -> None:
        tokens = out.layers[0].routing.num_tokens
        self.steps.append(_rates(_layer_sums(out), tokens, len(out.layers)))
        if step == self.snapshot_at:
            self.snapshot = copy.deepcopy(model), self.stream.fork()

    def mean(self, key: str) -> float:
        return statistics.fmean(s[key] for s in self.steps)


@dataclass
class Run:
    name: str
    model: nn.Module
    history: History
    record: TrainRecord
    seconds: float
    first_step: int = 0  # fine-tuned runs start at steps - finetune_steps

    @property
    def curve(self) -> dict[str, list[float]]:
        return {
            "steps": [self.first_step + s for s, _ in self.history.evals],
            "loss": [round(m["loss"], 5) for _, m in self.history.evals],
        }


def _train(
    name: str,
    model: nn.Module,
    stream: BatchStream,
    setup: Setup,
    steps: int,
    batches: list[Batch],
    snapshot_at: int | None = None,
    freeze_router: bool = False,
    first_step: int = 0,
) -> Run:
    record = TrainRecord(stream, snapshot_at)
    config = TrainConfig(
        steps=steps,
        lr=setup.lr,
        seed=setup.seed,
        eval_every=setup.eval_every,
        freeze_router=freeze_router,
        progress=False,
    )
    start = time.perf_counter()
    history = train(model, stream, config, evaluate=lambda m: evaluate(m, batches), callback=record)
    return Run(name, model, history, record, time.perf_counter() - start, first_step)


def train_router(setup: Setup, corpus: ByteCorpus, name: str, batches: list[Batch]) -> Run:
    """One router of ``ROUTERS`` trained from the seed's initial weights for ``setup.steps``;
    top-2 also keeps a snapshot at ``steps - finetune_steps`` for the fine-tuning recipes."""
    snapshot_at = setup.steps - setup.finetune_steps if name == REFERENCE else None
    return _train(
        name,
        build_model(setup, **ROUTERS[name]),
        BatchStream(corpus, setup),
        setup,
        setup.steps,
        batches,
        snapshot_at=snapshot_at,
    )


def finetune_top2(setup: Setup, top2: Run, name: str, batches: list[Batch]) -> Run:
    """``FINETUNED[name]`` (a GWFineTuning of chapter 3) on top-2's snapshot, for the last
    ``finetune_steps`` steps, on the batches top-2 saw in those steps."""
    # the course's variant: the balance loss stays at the model's 1e-2 (chapter 3 uses the code's 1e-3)
    recipe: GWFineTuning = recipes(setup.gw_threshold, balance_coef=None)[FINETUNED[name]]
    snapshot, stream = top2.record.snapshot
    model = recipe.apply(copy.deepcopy(snapshot))
    return _train(
        name,
        model,
        stream.fork(),
        setup,
        setup.finetune_steps,
        batches,
        freeze_router=recipe.freeze_router,
        first_step=setup.steps - setup.finetune_steps,
    )


def run_seed(
    setup: Setup, names: list[str] | None = None, timing_repeats: int = 10, progress: bool = True
) -> dict:
    """Every run for one seed (``names``: a subset of ROUTERS and FINETUNED, top-2 always):
    one row per run, the validation curves, and the interleaved step times."""
    names = names or [*ROUTERS, *FINETUNED]
    names = [REFERENCE] + [n for n in names if n != REFERENCE]
    if any(n in FINETUNED for n in names) and not 0 < setup.finetune_steps < setup.steps:
        raise ValueError(
            f"finetune_steps must be in [1, steps - 1], got {setup.finetune_steps} of {setup.steps}"
        )
    corpus = byte_corpus()
    batches = eval_batches(corpus, setup)
    runs: dict[str, Run] = {}
    for name in names:
        if name in FINETUNED:
            runs[name] = finetune_top2(setup, runs[REFERENCE], name, batches)
        else:
            runs[name] = train_router(setup, corpus, name, batches)
        if progress:
            print(
                f"  seed {setup.seed} {name:>18}: held-out loss {runs[name].history.final_eval['loss']:.4f}"
                f" ({runs[name].seconds:.0f} s)",
                flush=True,
            )
    models = {n: r.model for n, r in runs.items()}
    timing_batch = BatchStream(corpus, setup)(None)
    step = time_train_steps(models, timing_batch, repeats=timing_repeats)
    infer = inference_cost(models, timing_batch, repeats=timing_repeats, reference=REFERENCE)
    rows = [row(setup, runs, n, step, infer) for n in runs]
    return {"setup": asdict(setup), "rows": rows, "curves": {n: r.curve for n, r in runs.items()}}


def row(
    setup: Setup, runs: dict[str, Run], name: str, step: Timings, infer: dict[str, dict]
) -> dict:
    """One run's table row. ``step_ratio``: a training step of the final model, relative to
    top-2's; the ``train_*`` columns average over all ``steps`` steps of the recipe: for a
    fine-tuned run, top-2's first steps and then its own (``uncertain_share``, the share of tokens
    over the GW threshold, and ``broadcast_share``, the share broadcast after the slot cap: its own)."""
    run, ref = runs[name], runs[REFERENCE]
    train_steps = ref.record.steps[: run.first_step] + run.record.steps
    step_ratio = step.ratio(name, REFERENCE)
    final = run.history.final_eval
    return {
        "run": name,
        "seed": setup.seed,
        "loss": round(final["loss"], 5),
        "accuracy": round(final["accuracy"], 5),
        "loss_vs_top2": round(final["loss"] - ref.history.final_eval["loss"], 5),
        "experts_per_token": round(final["experts_per_token"], 4),
        "flops_per_token": round(final["flops_per_token"]),
        "flops_ratio": round(
            final["flops_per_token"] / ref.history.final_eval["flops_per_token"], 4
        ),
        "train_experts_per_token": round(
            statistics.fmean(s["experts_per_token"] for s in train_steps), 4
        ),
        "train_flops_ratio": round(
            statistics.fmean(s["flops_per_token"] for s in train_steps)
            / ref.record.mean("flops_per_token"),
            4,
        ),
        "step_ratio": round(step_ratio, 4),
        "train_step_ratio": round(
            (run.first_step + (setup.steps - run.first_step) * step_ratio) / setup.steps, 4
        ),
        "inference_ratio": round(infer[name]["time_ratio"], 4),
        "load_imbalance": round(final["load_imbalance"], 4),
        "dropped_tokens": round(final["dropped_tokens"], 5),
        "dropped_pairs": round(final["dropped_pairs"], 5),
        "train_dropped_tokens": round(
            statistics.fmean(s["dropped_tokens"] for s in train_steps), 5
        ),
        "uncertain_share": round(run.record.mean("uncertain"), 4),
        "broadcast_share": round(run.record.mean("broadcast"), 4),
        "train_seconds": round(run.seconds, 2),
    }


# ---- the table over seeds, the Pareto front, the picture ---------------------------------------

COLUMNS = (
    "loss",
    "loss_vs_top2",
    "accuracy",
    "experts_per_token",
    "flops_per_token",
    "flops_ratio",
    "train_experts_per_token",
    "train_flops_ratio",
    "step_ratio",
    "train_step_ratio",
    "inference_ratio",
    "load_imbalance",
    "dropped_tokens",
    "dropped_pairs",
    "train_dropped_tokens",
    "uncertain_share",
    "broadcast_share",
)


def summarize(per_seed: list[dict]) -> list[dict]:
    """Per run: the mean over seeds of every column, and the standard deviation over seeds of
    ``loss`` and of the paired ``loss_vs_top2`` (``*_std``, 0 for one seed)."""
    rows = [r for s in per_seed for r in s["rows"]]
    return seed_means(rows, "run", COLUMNS, std=("loss", "loss_vs_top2"), digits=5)


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


def write_results(per_seed: list[dict], out: Path) -> list[Path]:
    """results.json ({summary, per_seed}), results.csv (rows per seed, then means), pareto.png."""
    summary = summarize(per_seed)
    paths = write_seed_results(out, per_seed, summary)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5), layout="constrained")
    plot_pareto(summary, "flops_ratio", axes[0])
    plot_near_top2(summary, "flops_ratio", axes[1])
    plot_pareto(summary, "train_step_ratio", axes[2])
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    return [*paths, out / "pareto.png"]


def load_cached(path: str | Path | None = None) -> dict:
    """Results of the command; by default the shipped ones (data/compare/; see data/README.md)."""
    return load_json(path, "compare/results.json")


def as_results(cached: dict) -> harness.Results:
    """The cached comparison as the harness's results, for its paired statistics, with the
    held-out loss curves (this cache predates the harness's format)."""
    return harness.Results.from_rows(cached["per_seed"], "loss")


def print_table(summary: list[dict]) -> None:
    """The table, rounded: ratios are to top-2; dropped tokens and pairs at inference. MaxVio
    is MaxVio_global (Wang et al. 2024) on the held-out windows, load_imbalance - 1, mean over
    layers: 0 when every expert gets the same number of pairs."""
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


# ---- the command ---------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="every router on one model and data set: table (JSON, CSV) and Pareto plot"
    )
    add_setup_args(
        p,
        Setup(
            n_layers=4,
            d_model=128,
            d_hidden=256,
            block_size=64,
            batch_size=64,
            steps=3000,
            finetune_steps=1000,
            eval_windows=2048,
            eval_every=100,
        ),
    )
    p.add_argument(
        "--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2], action=DistinctSeeds
    )
    p.add_argument(
        "--runs",
        nargs="+",
        default=[*ROUTERS, *FINETUNED],
        choices=[*ROUTERS, *FINETUNED],
        metavar="RUN",
        help="default: all of " + ", ".join(repr(n) for n in [*ROUTERS, *FINETUNED]),
    )
    p.add_argument("--timing-repeats", type=positive_int, default=20)
    add_experiment_args(p, "runs/compare")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> list[dict]:
    set_threads(args)
    per_seed = [
        run_seed(
            setup_from_args(Setup, args, seed),
            args.runs,
            args.timing_repeats,
            progress=not args.no_progress,
        )
        for seed in args.seeds
    ]
    print_table(summarize(per_seed))
    for path in write_results(per_seed, args.out):
        print(f"wrote {path}")
    return per_seed

"""Chapter 8: routing since 2024 (``python -m course modern``): sigmoid scores balanced by an
auxiliary loss or by a bias with no loss (Wang et al. 2024, DeepSeek-V3), expert choice, shared
and fine-grained experts, on chapter 6's tiny byte-level language model.

For every seed all runs start from the same weights (a shared expert and the router of the
fine-grained model are drawn fresh; fine-grained experts are the coarse ones cut into pieces)
and see the same batches in the same order; no run has a capacity limit. Sigmoid runs train
without the z-loss, as in Wang et al. Balance is measured as MaxVio = (max load - mean load) /
mean load: MaxVio_batch per training step (the mean over the last quarter of the steps),
MaxVio_global over the held-out set. ``causal_leak`` measures how much the earlier positions of
a window change when only its last bytes change: 0 for a causal router.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from torch import nn

from course import common, harness
from course.adaptive import time_train_steps
from course.common import (
    DistinctSeeds,
    add_experiment_args,
    add_setup_args,
    load_json,
    seed_means,
    set_threads,
    setup_from_args,
    write_seed_results,
)
from course.compare import BatchStream, eval_batches
from minimoe.analysis import RoutingRecorder, expert_count_shares, experts_per_token, max_violation
from minimoe.cli import non_negative_int, positive_int
from minimoe.data import BYTE_VOCAB_SIZE, Batch, ByteCorpus, byte_corpus
from minimoe.layer import fine_grained, moe_layers
from minimoe.model import ModelConfig, TinyTransformer
from minimoe.routing import ExpertChoice, Routing, SigmoidTopK
from minimoe.train import TrainConfig, train

U = 1e-2  # our bias rate: Wang et al.'s u = 1e-3 moves the bias 0.6 at most in 600 steps


def sigmoid(alpha: float = 0.0, **router) -> dict:
    """MoEConfig changes: a SigmoidTopK (bias frozen unless ``bias_rate``), no z-loss, and Wang
    et al.'s balance loss alpha * sum_i f_i P_i, f_i = E / (k T) * tokens choosing i: the
    library's loss counting every selected expert, divided by k."""
    spec = SigmoidTopK(**({"bias_rate": 0.0} | router))
    return {"router": spec, "z_coef": 0.0, "balance_coef": alpha / spec.k} | (
        {"balance_count": "selected"} if alpha else {}
    )


# name -> MoEConfig changes; "shared": a shared expert as wide as a routed one;
# "fine_grained": m, every expert cut into m (layer.fine_grained)
RUNS: dict[str, dict] = {
    "no balancing": sigmoid(),
    "aux 1e-3": sigmoid(1e-3),  # Wang et al.'s baseline alpha
    "aux 1e-2": sigmoid(1e-2),  # the course's alpha
    "seq aux 1e-3": sigmoid() | {"seq_balance_coef": 1e-3},  # DeepSeek-V3's sequence-wise loss
    "loss-free 1e-3": sigmoid(bias_rate=1e-3),  # the paper's u
    "loss-free 1e-2": sigmoid(bias_rate=U),
    "loss-free 1e-1": sigmoid(bias_rate=1e-1),  # too large
    "loss-free + seq": sigmoid(bias_rate=U) | {"seq_balance_coef": 1e-4},  # DeepSeek-V3's recipe
    "softmax aux 1e-3": sigmoid(1e-3, score="softmax"),  # Wang et al.'s softmax ablation
    "softmax loss-free": sigmoid(score="softmax", bias_rate=U),
    "expert choice": sigmoid() | {"router": ExpertChoice(capacity_factor=2.0)},  # no losses
    # k=1: renormalized, g = s / s = 1 would give the router no gradient
    "shared + top-1": sigmoid(k=1, renormalize=False, bias_rate=U) | {"shared": True},
    "gated shared + top-1": sigmoid(k=1, renormalize=False, bias_rate=U)
    | {"shared": True, "shared_gate": True},  # Qwen2-MoE
    "fine-grained": sigmoid(bias_rate=U) | {"fine_grained": 4},  # E = 32, k = 8
}
BALANCING = list(RUNS)[:10]  # the top-2 runs that differ only in how they balance
BASE = "loss-free 1e-2"  # the top-2 that expert choice, shared and fine-grained are compared with
# the run each one's held-out loss is paired with (the papers' comparisons); the others: BASE
VERSUS = dict.fromkeys(
    [
        "no balancing",
        "aux 1e-3",
        "aux 1e-2",
        "loss-free 1e-3",
        "loss-free 1e-2",
        "softmax aux 1e-3",
    ],
    "aux 1e-3",
) | {"softmax loss-free": "softmax aux 1e-3", "gated shared + top-1": "shared + top-1"}


def versus(name: str) -> str:
    return VERSUS.get(name, BASE)


@dataclass
class Setup(common.Setup):
    """The chapter's scale (the defaults: about 25 s per run on one core)."""

    block_size: int = 32
    eval_windows: int = 512  # held-out windows of block_size bytes, scored in batches of batch_size
    record_every: int = 20  # trajectory points: MaxVio_batch and training loss, averaged
    bias_every: int = 40  # trajectory points of the balancing bias


def model_config(setup: Setup, name: str) -> ModelConfig:
    """The tiny LM of run ``name``."""
    changes = dict(RUNS[name])
    m = changes.pop("fine_grained", 1)
    if changes.pop("shared", False):
        changes["shared_hidden"] = setup.d_hidden
    config = setup.model_config(BYTE_VOCAB_SIZE, setup.block_size, **changes)
    return replace(config, moe=fine_grained(config.moe, m)) if m > 1 else config


def split_experts(gate_up: torch.Tensor, down: torch.Tensor, m: int) -> tuple[torch.Tensor, ...]:
    """SwiGLU experts (E, 2h, d), (E, d, h) cut into m E experts of width h / m, so that the m
    pieces of expert e (e m, ..., e m + m - 1) sum to it: y = sum over hidden units."""
    E, two_h, d = gate_up.shape
    h = two_h // 2
    gate, up = gate_up.view(E, 2, m, h // m, d).unbind(1)  # (E, m, h/m, d) each
    pieces = torch.cat([gate, up], dim=2).reshape(E * m, 2 * h // m, d)
    return pieces, down.view(E, d, m, h // m).transpose(1, 2).reshape(E * m, d, h // m)


def build_model(setup: Setup, name: str) -> TinyTransformer:
    """Run ``name``'s model with the seed's initial weights: those of BASE wherever the shapes
    agree; fine-grained experts are BASE's cut into pieces (``split_experts``); a shared expert
    and the fine-grained router are the model's own seeded draw."""
    torch.manual_seed(setup.seed)
    init = TinyTransformer(model_config(setup, BASE)).state_dict()
    torch.manual_seed(setup.seed)
    model = TinyTransformer(model_config(setup, name))
    own = model.state_dict()
    load = {k: v for k, v in init.items() if k in own and own[k].shape == v.shape}
    m = RUNS[name].get("fine_grained", 1)
    for key in [k for k in init if k.endswith("experts.gate_up")] if m > 1 else []:
        down = key.replace("gate_up", "down")
        load[key], load[down] = split_experts(init[key], init[down], m)
    fresh = set(own) - set(load)
    assert all(".shared" in k or k.endswith(("gate.weight", "bias")) for k in fresh), fresh
    model.load_state_dict(load, strict=False)
    return model.to(setup.device)


# ---- measures ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> dict:
    """Held-out loss (nats per byte) and accuracy; MaxVio_global per layer (over all the held-out
    tokens), experts per token, the share of (token, layer) pairs routed to no expert, and the
    shares of pairs routed to 0, 1, 2, ... experts."""
    model.eval()
    device = next(model.parameters()).device
    loss = correct = tokens = 0.0
    with RoutingRecorder(model) as rec:
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            out = model(**b)
            loss += out.loss.item() * b["targets"].numel()
            correct += (out.logits.argmax(-1) == b["targets"]).sum().item()
            tokens += b["targets"].numel()
    routings = [rec.routing(i) for i in range(len(rec))]
    counts = expert_count_shares(Routing.cat(routings))  # over every (token, layer) pair
    return {
        "loss": loss / tokens,
        "accuracy": correct / tokens,
        "maxvio_global_layers": [max_violation(r) for r in routings],
        "experts_per_token": statistics.fmean(experts_per_token(r) for r in routings),
        "unrouted": counts.get(0, 0.0),
        "expert_counts": [round(v, 5) for v in counts.values()],
    }


@torch.no_grad()
def causal_leak(model: nn.Module, batch: Batch, positions: int = 1) -> dict[str, float]:
    """Replace the last ``positions`` bytes of every window (by bytes of the batch drawn at
    random) and compare the earlier positions, whose inputs did not change, in evaluation mode:
    ``leak_loss`` the mean |change| of their loss, ``leak_logits`` the largest |change| of a
    logit, ``leak_routes`` the share of their (token, layer) expert sets that changed. All 0 for
    a causal model."""
    model.eval()
    device = next(model.parameters()).device
    idx, targets = batch["idx"].to(device), batch["targets"].to(device)
    changed = idx.clone()
    pick = torch.randint(
        idx.numel(), (idx.shape[0], positions), generator=torch.Generator().manual_seed(0)
    )
    changed[:, -positions:] = idx.flatten()[pick.to(device)]
    a, b = model(idx=idx), model(idx=changed)
    B, L = idx.shape
    early = slice(0, L - positions)

    def losses(out):  # (B, L - positions)
        logits = out.logits[:, early]
        return F.cross_entropy(logits.transpose(1, 2), targets[:, early], reduction="none")

    def changed_routes(x, y) -> float:  # (B, L, E) masks: share of earlier expert sets changed
        return (x.mask != y.mask).view(B, L, -1)[:, early].any(-1).float().mean().item()

    return {
        "leak_loss": (losses(a) - losses(b)).abs().mean().item(),
        "leak_logits": (a.logits[:, early] - b.logits[:, early]).abs().max().item(),
        "leak_routes": statistics.fmean(
            changed_routes(x.routing, y.routing) for x, y in zip(a.layers, b.layers)
        ),
    }


@dataclass
class Trace:
    """Training callback: each step's share of unrouted (token, layer) pairs; every ``every``
    steps each layer's balancing bias (stateful routers only)."""

    every: int
    unrouted: list[float] = field(default_factory=list)
    bias: list[list[list[float]]] = field(default_factory=list)  # [point][layer][expert]

    def __call__(self, step: int, model: nn.Module, out) -> None:
        tokens = out.layers[0].routing.num_tokens * len(out.layers)
        self.unrouted.append(sum(m.stats.unrouted_tokens.item() for m in out.layers) / tokens)
        layers = moe_layers(model)
        if step % self.every == 0 and hasattr(layers[0].router_state, "bias"):
            self.bias.append([m.router_state.bias.tolist() for m in layers])


def window_means(values: list[float], every: int) -> list[float]:
    return [round(statistics.fmean(values[i : i + every]), 4) for i in range(0, len(values), every)]


# ---- one seed --------------------------------------------------------------------------------


def train_run(setup: Setup, corpus: ByteCorpus, name: str, batches: list[Batch]) -> dict:
    """Run ``name`` trained from the seed's weights: its model, row measures and curves."""
    model, trace = build_model(setup, name), Trace(setup.bias_every)
    config = TrainConfig(steps=setup.steps, lr=setup.lr, seed=setup.seed, progress=False)
    start = time.perf_counter()
    history = train(model, BatchStream(corpus, setup), config, callback=trace)
    seconds = time.perf_counter() - start
    final = evaluate(model, batches)
    batch_vio = [statistics.fmean(v) for v in history.max_violation]  # mean over layers
    last = batch_vio[-max(1, len(batch_vio) // 4) :]
    row = {
        "loss": final["loss"],
        "accuracy": final["accuracy"],
        "maxvio_batch": statistics.fmean(last),
        "maxvio_global": statistics.fmean(final["maxvio_global_layers"]),
        "experts_per_token": final["experts_per_token"],
        "unrouted": final["unrouted"],
        "train_unrouted": statistics.fmean(trace.unrouted),
        **causal_leak(model, batches[0]),
        "step_ms": 1000 * seconds / max(setup.steps, 1),
        "train_seconds": seconds,
    }
    curves = {
        "steps": list(range(setup.record_every, setup.steps + 1, setup.record_every)),
        "maxvio_batch": window_means(batch_vio, setup.record_every),
        "train_loss": window_means(history.loss, setup.record_every),
        "maxvio_global_layers": [round(v, 4) for v in final["maxvio_global_layers"]],
        "expert_counts": final["expert_counts"],
        "bias_steps": list(range(setup.bias_every, setup.steps + 1, setup.bias_every)),
        "bias": [[[round(b, 4) for b in layer] for layer in p] for p in trace.bias] or None,
    }
    return {"model": model, "row": row, "curves": curves}


def with_partners(names: list[str]) -> list[str]:
    """``names`` and the runs they are paired with, in RUNS's order."""
    wanted = set(names) | {versus(n) for n in names}
    return [n for n in RUNS if n in wanted]


def run_seed(
    setup: Setup, names: list[str] | None = None, timing_repeats: int = 10, progress: bool = True
) -> dict:
    """Every run of ``names`` (default: all; their partners always) for one seed: a row each,
    the curves, the configs, and the training step's time relative to BASE (interleaved)."""
    names = with_partners(names or list(RUNS))
    corpus = byte_corpus()
    batches = eval_batches(corpus, setup)
    runs = {}
    for name in names:
        runs[name] = train_run(setup, corpus, name, batches)
        if progress:
            r = runs[name]["row"]
            print(
                f"  seed {setup.seed} {name:>20}: held-out loss {r['loss']:.4f}, MaxVio_global "
                f"{r['maxvio_global']:.3f} ({r['train_seconds']:.0f} s)",
                flush=True,
            )
    models = {n: r["model"] for n, r in runs.items()}
    step = time_train_steps(models, BatchStream(corpus, setup)(None), repeats=timing_repeats)
    reference = BASE if BASE in models else names[0]
    rows = []
    for name, r in runs.items():
        vs = versus(name) if versus(name) in runs else name
        row = {"run": name, "seed": setup.seed, "versus": vs} | r["row"]
        row["loss_vs"] = row["loss"] - runs[vs]["row"]["loss"]
        row["step_ratio"] = step.ratio(name, reference)
        rows.append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    return {
        "setup": asdict(setup),
        "rows": rows,
        "curves": {n: r["curves"] for n, r in runs.items()},
        "configs": {n: r["model"].config.moe.to_dict() for n, r in runs.items()},
    }


# ---- the table over seeds, the pictures -------------------------------------------------------

COLUMNS = (
    "loss loss_vs accuracy maxvio_batch maxvio_global experts_per_token unrouted train_unrouted "
    "leak_loss leak_logits leak_routes step_ms step_ratio"
).split()
SPREAD = ("loss", "loss_vs", "maxvio_batch", "maxvio_global")


def summarize(per_seed: list[dict]) -> list[dict]:
    """Per run: its partner, the mean over seeds of every column, and the standard deviation over
    seeds (``*_std``) of the loss, the paired difference and the two MaxVio."""
    rows = [r for s in per_seed for r in s["rows"]]
    partner = {r["run"]: r["versus"] for r in rows}
    summary = seed_means(rows, "run", COLUMNS, std=SPREAD, digits=5)
    return [{"run": r["run"], "versus": partner[r["run"]]} | r for r in summary]


def plot_maxvio(per_seed: list[dict], names: list[str], ax: Axes | None = None) -> Axes:
    """MaxVio_batch during training (mean over layers, seeds and ``record_every`` steps)."""
    ax = ax if ax is not None else plt.subplots(figsize=(6, 3.5), layout="constrained")[1]
    for name in names:
        curves = [s["curves"][name] for s in per_seed]
        mean = [statistics.fmean(v) for v in zip(*(c["maxvio_batch"] for c in curves))]
        ax.plot(curves[0]["steps"], mean, label=name)
    ax.set(
        xlabel="training step", ylabel="MaxVio_batch", ylim=(0, None), title="Balance in training"
    )
    ax.legend(fontsize=7, ncols=2)
    return ax


def plot_bias(curves: dict, layer: int = 0, ax: Axes | None = None) -> Axes:
    """One run's bias per expert during training (``curves``: a run's curves of one seed)."""
    ax = ax if ax is not None else plt.subplots(figsize=(5, 3.5), layout="constrained")[1]
    bias = torch.tensor(curves["bias"])[:, layer]  # (points, E)
    steps = [0] + curves["bias_steps"]
    ax.plot(steps, torch.cat([torch.zeros(1, bias.shape[1]), bias]).numpy(), lw=1)
    ax.set(xlabel="training step", ylabel=f"bias b_i (layer {layer})")
    return ax


def plot_bars(summary: list[dict], column: str, ax: Axes | None = None) -> Axes:
    """One bar per run (the mean over seeds), from zero; error bars: the std over seeds."""
    ax = ax if ax is not None else plt.subplots(figsize=(7, 3.5), layout="constrained")[1]
    names = [r["run"] for r in summary]
    err = [r.get(f"{column}_std", 0.0) for r in summary]
    ax.bar(names, [r[column] for r in summary], yerr=err, capsize=3, color="C0")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel(column)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    return ax


def write_results(per_seed: list[dict], out) -> list:
    """results.json ({summary, per_seed}), results.csv, maxvio.png, bias.png, bars.png."""
    summary = summarize(per_seed)
    paths = write_seed_results(out, per_seed, summary)
    names = [r["run"] for r in summary]
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    plot_maxvio(per_seed, [n for n in names if n in BALANCING], ax)
    figs = {"maxvio.png": fig}
    stateful = [n for n in names if "loss-free" in n]  # 8 experts, top-2
    fig, axes = plt.subplots(1, len(stateful), figsize=(3 * len(stateful), 3), layout="constrained")
    for ax, name in zip(axes if len(stateful) > 1 else [axes], stateful):
        plot_bias(per_seed[0]["curves"][name], 0, ax).set_title(name, fontsize=8)
    figs["bias.png"] = fig
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    plot_bars(summary, "maxvio_global", axes[0])
    plot_bars(summary, "loss_vs", axes[1]).set_ylabel("held-out loss - its partner's")
    figs["bars.png"] = fig
    for file, fig in figs.items():
        fig.savefig(out / file, dpi=100)
        plt.close(fig)
        paths.append(out / file)
    return paths


def load_cached(path=None) -> dict:
    """Results of the command; by default the shipped ones (data/modern/; see data/README.md)."""
    return load_json(path, "modern/results.json")


def as_results(cached: dict) -> harness.Results:
    """The cached runs as the harness's results, for its paired statistics, with the training
    loss as the curve (this cache records no held-out curve and predates the harness's format)."""
    return harness.Results.from_rows(cached["per_seed"], "train_loss")


def family() -> list[tuple[str, str, str]]:
    """The chapter's comparisons of held-out loss: every run against the run it is paired
    with, and the bias against the course's stronger auxiliary loss."""
    pairs = [(n, versus(n), "loss") for n in RUNS if versus(n) != n]
    return pairs + [("loss-free 1e-2", "aux 1e-2", "loss")]


def print_table(summary: list[dict]) -> None:
    print(
        f"{'run':>20} {'loss':>6} {'vs':>16} {'':>16} {'MaxVio b':>8} {'MaxVio g':>8} "
        f"{'exp/tok':>7} {'unrouted':>8} {'leak':>6} {'step':>5}"
    )
    for r in summary:
        print(
            f"{r['run']:>20} {r['loss']:>6.3f} {r['versus']:>16} {r['loss_vs']:>+7.4f} ± "
            f"{r['loss_vs_std']:.4f} {r['maxvio_batch']:>8.3f} {r['maxvio_global']:>8.3f} "
            f"{r['experts_per_token']:>7.2f} {r['unrouted']:>8.1%} {r['leak_loss']:>6.4f} "
            f"{r['step_ratio']:>5.2f}"
        )


# ---- the command -----------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "modern", help="loss-free balancing, expert choice, shared and fine-grained experts"
    )
    add_setup_args(p, Setup())
    p.add_argument(
        "--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2], action=DistinctSeeds
    )
    p.add_argument(
        "--runs",
        nargs="+",
        default=list(RUNS),
        choices=list(RUNS),
        metavar="RUN",
        help="default: all of " + ", ".join(map(repr, RUNS)) + " (with their partners)",
    )
    p.add_argument("--timing-repeats", type=positive_int, default=10)
    add_experiment_args(p, "runs/modern")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> list[dict]:
    set_threads(args)
    per_seed = [
        run_seed(
            setup_from_args(Setup, args, seed), args.runs, args.timing_repeats, not args.no_progress
        )
        for seed in args.seeds
    ]
    print_table(summarize(per_seed))
    for path in write_results(per_seed, args.out):
        print(f"wrote {path}")
    return per_seed

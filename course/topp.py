"""Chapter 4: top-2 vs top-p routing on the graded multi-task data (``python -m course topp``).

One run trains a TinyTransformer on ``make_multitask`` (copy < reverse < sort < add: the task
index is the difficulty level) and measures on a fixed probe of samples from another seed that
do not occur in its training set: experts per token per layer and per task over training
(``ExpertsPerTokenTracker``), and quality per task (teacher-forced argmax: token accuracy and
exact match of whole answers). Padding positions
carry no loss and are left out of every routing statistic.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor, nn

from course import common
from course.common import (
    DistinctSeeds,
    add_experiment_args,
    add_setup_args,
    load_json,
    moe_changes,
    set_threads,
    setup_from_args,
    write_csv,
)
from minimoe.analysis import ExpertsPerTokenTracker, RoutingRecorder, experts_per_token_by_group
from minimoe.cli import non_negative, non_negative_int, positive, write_json
from minimoe.data import (
    PAD_ID,
    TASKS,
    VOCAB,
    Batch,
    MultiTaskData,
    make_multitask,
    multitask_batches,
    seq_len,
)
from minimoe.model import TinyTransformer
from minimoe.routing import TopP
from minimoe.train import History, TrainConfig, seed_everything, train

MAX_LEN = 6  # longest operand: sequences of seq_len(6) = 22 tokens


@dataclass
class TopPSetup(common.Setup):
    """What every run of one comparison shares; the router settings are ``run``'s arguments."""

    n_layers: int = 3
    n_train: int = 8192
    n_probe: int = 512  # held-out probe samples (seed + 1, none in the training set)
    track_every: int = 50


PAPER_LOSSES = dict(TopP.paper_losses)  # balance 1e-2 (each router counts it its way), no z-loss


def variants(ps: list[float], betas: list[float], z_coefs: list[float] = ()) -> dict[str, dict]:
    """Named runs, as results.json names them (the router by name, its settings by their
    command-line names: ``common.moe_changes``), all with the Top-P paper's losses
    (``PAPER_LOSSES``; top-2 gets the same, so only the router differs): top-2, top-p at the
    paper's p=0.4 and beta (TopP's default), top-p with other betas, the paper's defaults at
    other p, and top-2 and top-p with a router z-loss added (``z_coefs``; the course's own
    losses carry 1e-3: ``MoEConfig``'s default)."""
    top2, top_p = {"router": "top_k", "k": 2}, {"router": "top_p", "top_p": 0.4}
    runs = {"top-2": top2 | PAPER_LOSSES, "top-p": top_p | PAPER_LOSSES}
    runs |= {f"top-p beta={b:g}": top_p | PAPER_LOSSES | {"dynamic_coef": b} for b in betas}
    for z in z_coefs:
        runs |= {
            f"{name} z={z:g}": moe | PAPER_LOSSES | {"z_coef": z}
            for name, moe in (("top-2", top2), ("top-p", top_p))
        }
    runs |= {
        f"top-p p={p:g}": {"router": "top_p", "top_p": p} | PAPER_LOSSES for p in ps if p != 0.4
    }
    return runs


@dataclass
class Probe:
    """Held-out samples (another seed than the training set's, and none that occurs in it),
    with each token's task as a group label,
    flattened like the model's tokens: ``task`` on every real token, ``answer_task`` only on
    the positions that predict an answer token (from "=" on); -1 elsewhere (left out)."""

    data: MultiTaskData
    task: Tensor  # (N * L,) long, -1 where the input is <pad>
    answer_task: Tensor  # (N * L,) long, -1 where the target is not part of the answer

    @classmethod
    def make(cls, n: int, seed: int, exclude: MultiTaskData | None = None) -> Probe:
        """``n`` samples of ``make_multitask(..., seed=seed)``, an equal share per task (to
        within one), none of whose inputs occurs in ``exclude`` (the training set)."""
        if exclude is None:
            data = make_multitask(n, max_len=MAX_LEN, seed=seed)
        else:
            data = unseen(n, seed, exclude)
        task = data.task[:, None].expand_as(data.inputs)  # (N, L)
        return cls(
            data,
            task.masked_fill(data.inputs == PAD_ID, -1).reshape(-1),
            task.masked_fill(~data.answer_mask, -1).reshape(-1),
        )

    def batch(self, device: str = "cpu") -> Batch:
        return {"idx": self.data.inputs.to(device), "targets": self.data.targets.to(device)}

    def counts(self, answers: bool = False) -> dict[int, int]:
        """Tokens per label of ``task`` (or ``answer_task``)."""
        labels, n = (self.answer_task if answers else self.task).unique(return_counts=True)
        return dict(zip(labels.tolist(), n.tolist()))


def unseen(n: int, seed: int, exclude: MultiTaskData) -> MultiTaskData:
    """``n`` samples from a stream seeded ``seed`` whose inputs do not occur in ``exclude``:
    per task, the first of its share (n // 4, the first n % 4 tasks one more), in stream order.
    Short operands are rarer than in training: 2-digit copy problems (100 in all) are nearly
    all seen by an 8192-sample training set."""
    seen = {tuple(row) for row in exclude.inputs.tolist()}
    quota = [n // len(TASKS) + (t < n % len(TASKS)) for t in range(len(TASKS))]
    pool = make_multitask(8 * n, max_len=MAX_LEN, seed=seed)
    keep = []
    for i, (row, t) in enumerate(zip(pool.inputs.tolist(), pool.task.tolist(), strict=True)):
        if quota[t] and tuple(row) not in seen:
            keep.append(i)
            quota[t] -= 1
    if any(quota):
        raise ValueError(f"only {len(keep)} of n={n} probe samples are unseen in training")
    idx = torch.tensor(keep)
    return MultiTaskData(pool.inputs[idx], pool.targets[idx], pool.task[idx], pool.length[idx])


def _device(model: nn.Module) -> str:
    return next(model.parameters()).device.type


@torch.no_grad()
def task_quality(model: nn.Module, probe: Probe) -> dict[str, dict[str, float]]:
    """Per task: token accuracy on answer positions, and exact match (every answer token right)."""
    model.eval()
    pred = model(**probe.batch(_device(model))).logits.argmax(-1).cpu()  # (N, L) teacher-forced
    scored = probe.data.answer_mask  # (N, L)
    right = (pred == probe.data.targets) & scored
    out = {}
    for t, name in enumerate(TASKS):
        rows = probe.data.task == t
        out[name] = {
            "token_accuracy": right[rows].sum().item() / max(scored[rows].sum().item(), 1),
            "exact_match": (right[rows] == scored[rows]).all(dim=1).float().mean().item(),
        }
    return out


def real_token_mean(per_group: dict[int, float], counts: dict[int, int]) -> float:
    """Mean over real tokens of per-group means (groups as the probe's task labels; -1 = padding)."""
    groups = [g for g in per_group if g >= 0]
    return sum(per_group[g] * counts[g] for g in groups) / sum(counts[g] for g in groups)


def summarize_groups(per_layer_groups: list[dict[int, float]], counts: dict[int, int]) -> dict:
    """One tracker record (per layer {task: experts per token}) -> the statistics we report."""
    tasks = range(len(TASKS))
    per_layer = [real_token_mean(g, counts) for g in per_layer_groups]
    return {
        "mean": float(np.mean(per_layer)),  # every layer sees the same tokens
        "per_layer": per_layer,
        "per_task": [float(np.mean([g[t] for g in per_layer_groups])) for t in tasks],
        "per_layer_task": [[g[t] for t in tasks] for g in per_layer_groups],
    }


@torch.no_grad()
def routing_stats(model: nn.Module, probe: Probe) -> dict:
    """Experts per token of the probe's real tokens (mean, per layer, per task, per layer and
    task), and the same on answer positions only (``answers``)."""
    model.eval()
    with RoutingRecorder(model) as rec:
        model(**probe.batch(_device(model)))
    routings = [rec.routing(i) for i in range(len(rec))]
    stats = summarize_groups(
        [experts_per_token_by_group(r, probe.task) for r in routings], probe.counts()
    )
    answers = [experts_per_token_by_group(r, probe.answer_task) for r in routings]
    return stats | {"answers": summarize_groups(answers, probe.counts(answers=True))}


@dataclass
class Trained:
    """A trained model with its training record."""

    model: TinyTransformer
    moe: dict  # the run it is, as results.json names it (``variants``)
    history: History
    tracker: ExpertsPerTokenTracker  # experts per token on the probe every setup.track_every steps
    seconds: float  # training time


def train_model(setup: TopPSetup, probe: Probe, progress: bool = False, **moe) -> Trained:
    """Train one model; ``moe``: the run as results.json names it (router="top_p", top_p=0.4)."""
    seed_everything(setup.seed)
    config = setup.model_config(len(VOCAB), seq_len(MAX_LEN), **moe_changes(moe))
    model = TinyTransformer(config).to(setup.device)
    data = training_data(setup)
    tracker = ExpertsPerTokenTracker(
        probe.batch(setup.device), every=setup.track_every, groups=probe.task
    )
    tracker(0, model)  # before training
    start = time.perf_counter()
    history = train(
        model,
        multitask_batches(data, setup.batch_size),
        TrainConfig(steps=setup.steps, lr=setup.lr, seed=setup.seed, progress=progress),
        callback=tracker,
    )
    return Trained(model, moe, history, tracker, time.perf_counter() - start)


def measure(trained: Trained, probe: Probe) -> dict:
    """A trained model's measurements as plain numbers, ready for JSON."""
    counts = probe.counts()
    records = [summarize_groups(g, counts) for g in trained.tracker.per_group]
    return {
        "moe": trained.moe,
        "dynamic_beta": trained.model.config.moe.dynamic_beta,
        "seconds": trained.seconds,
        "loss": [round(v, 5) for v in trained.history.loss],
        "quality": task_quality(trained.model, probe),
        "routing": routing_stats(trained.model, probe),
        "trajectory": {"steps": trained.tracker.steps}
        | {k: [r[k] for r in records] for k in ("mean", "per_layer", "per_task")},
    }


def training_data(setup: TopPSetup) -> MultiTaskData:
    """The run's training samples (seeded by ``setup.seed``)."""
    return make_multitask(setup.n_train, max_len=MAX_LEN, seed=setup.seed)


def make_probe(setup: TopPSetup) -> Probe:
    """The run's probe: ``setup.n_probe`` samples of seed + 1 that its training set lacks."""
    return Probe.make(setup.n_probe, seed=setup.seed + 1, exclude=training_data(setup))


def run(setup: TopPSetup, probe: Probe | None = None, progress: bool = False, **moe) -> dict:
    """Train one model and measure it (by default on ``make_probe(setup)``)."""
    probe = probe or make_probe(setup)
    return measure(train_model(setup, probe, progress, **moe), probe)


def compare(
    setup: TopPSetup, runs: dict[str, dict], seeds: list[int], progress: bool = False
) -> dict:
    """Every named run for every seed."""
    results: dict[str, list[dict]] = {}
    for name, moe in runs.items():
        for seed in seeds:
            r = run(replace(setup, seed=seed), progress=progress, **moe)
            results.setdefault(name, []).append(r | {"seed": seed})
            print(
                f"{name:>20} seed {seed}: experts/token {r['routing']['mean']:.2f}  exact match "
                + " ".join(f"{t} {q['exact_match']:.2f}" for t, q in r["quality"].items())
                + f"  ({r['seconds']:.0f} s)",
                flush=True,
            )
    return {"setup": asdict(setup), "runs": results}


def load_results(path: str | Path | None = None) -> dict:
    """Results written by the command; by default the chapter's cache (data/topp/; see data/README.md)."""
    return load_json(path, "topp/results.json")


# ---- the command: tables and plots -----------------------------------------------------------


def table(results: dict) -> list[dict]:
    """One row per run and seed: the numbers of the chapter's comparison."""
    rows = []
    for name, runs in results["runs"].items():
        for r in runs:
            row = {
                "run": name,
                "seed": r["seed"],
                "p": r["moe"].get("top_p", ""),
                "beta": r["dynamic_beta"],
                "experts_per_token": round(r["routing"]["mean"], 3),
            }
            row |= {f"ept_layer{i}": round(v, 3) for i, v in enumerate(r["routing"]["per_layer"])}
            row |= {f"ept_{t}": round(v, 3) for t, v in zip(TASKS, r["routing"]["per_task"])}
            row |= {
                f"ept_answer_{t}": round(v, 3)
                for t, v in zip(TASKS, r["routing"]["answers"]["per_task"])
            }
            row |= {f"exact_{t}": round(q["exact_match"], 3) for t, q in r["quality"].items()}
            row |= {
                f"token_acc_{t}": round(q["token_accuracy"], 3) for t, q in r["quality"].items()
            }
            row["final_loss"] = round(float(np.mean(r["loss"][-50:])), 4)
            rows.append(row)
    return rows


def plot_results(results: dict, out: Path) -> list[Path]:
    """trajectory.png, by_task_layer.png, p_sweep.png in ``out``."""
    runs = {name: rs[0] for name, rs in results["runs"].items()}
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    for name, r in runs.items():
        if not name.startswith("top-p p="):
            ax.plot(r["trajectory"]["steps"], r["trajectory"]["mean"], marker=".", label=name)
    ax.set(xlabel="step", ylabel="experts per token", title="Experts per token over training")
    if ax.lines:
        ax.legend(fontsize=8)
    paths.append(_save(fig, out / "trajectory.png"))

    if "top-p" not in runs:  # --only into a new folder: no main run to draw
        return paths
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")
    top_p = runs["top-p"]["routing"]
    axes[0].bar(TASKS, top_p["per_task"])
    axes[0].set(xlabel="task (difficulty)", ylabel="experts per token", title="top-p: by task")
    axes[1].bar(range(len(top_p["per_layer"])), top_p["per_layer"])
    axes[1].set(xlabel="MoE layer", ylabel="experts per token", title="top-p: by layer")
    paths.append(_save(fig, out / "by_task_layer.png"))

    sweep = sorted(
        (r["moe"]["top_p"], r)
        for name, r in runs.items()
        if name == "top-p" or name.startswith("top-p p=")
    )
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")
    ps = [p for p, _ in sweep]
    axes[0].plot(ps, [r["routing"]["mean"] for _, r in sweep], marker="o")
    axes[0].set(xlabel="p", ylabel="experts per token", title="Experts per token vs p")
    for t in TASKS:
        axes[1].plot(ps, [r["quality"][t]["exact_match"] for _, r in sweep], marker="o", label=t)
    axes[1].set(xlabel="p", ylabel="exact match", title="Quality vs p")
    axes[1].legend(fontsize=8)
    paths.append(_save(fig, out / "p_sweep.png"))
    return paths


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topp", help="top-2 vs top-p routing on the graded tasks: table and plots")
    add_setup_args(p, TopPSetup(n_layers=4, steps=2000, batch_size=64))
    p.add_argument(
        "--seeds",
        type=non_negative_int,
        nargs="+",
        default=[0, 1, 2],
        action=DistinctSeeds,
        help="seeds (every run)",
    )
    p.add_argument(
        "--ps",
        type=positive,
        nargs="+",
        default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
        help="p values of the sweep",
    )
    p.add_argument(
        "--betas",
        type=non_negative,
        nargs="+",
        default=[0.0, 1e-3, 1e-2],
        help="dynamic-loss coefficients to compare with the paper's 1e-4, at p=0.4",
    )
    p.add_argument(
        "--z-coefs",
        type=non_negative,
        nargs="*",
        default=[1e-3],
        help="router z-loss coefficients added to top-2 and to top-p at p=0.4, beta=1e-4 "
        "(the paper has none; the course's default is 1e-3)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="RUN",
        help="run only these named runs (e.g. 'top-p z=0.001') and merge them into the "
        "results.json in --out, if there is one, keeping its other runs",
    )
    add_experiment_args(p, out="runs/topp")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> dict:
    set_threads(args)
    setup = setup_from_args(TopPSetup, args, args.seeds[0])
    runs = variants(args.ps, args.betas, args.z_coefs)
    if args.only:
        unknown = sorted(set(args.only) - set(runs))
        if unknown:
            raise ValueError(f"unknown run names {unknown}; choose from {list(runs)}")
        runs = {name: moe for name, moe in runs.items() if name in args.only}
    results = compare(setup, runs, args.seeds, progress=not args.no_progress)
    if args.only and (args.out / "results.json").exists():
        # merge: the new runs next to the cached ones, whose setup must be the same
        cached = load_results(args.out / "results.json")
        if cached["setup"] | {"seed": setup.seed} != results["setup"]:
            raise ValueError(
                f"--only: the setup differs from {args.out / 'results.json'}'s: "
                f"{cached['setup']} vs {results['setup']}"
            )
        results = {"setup": cached["setup"], "runs": cached["runs"] | results["runs"]}
    rows = table(results)
    write_json(args.out / "results.json", results)
    write_csv(args.out / "results.csv", rows)
    plots = plot_results(results, args.out)
    print(f"wrote {args.out / 'results.json'}, results.csv and {', '.join(p.name for p in plots)}")
    return results

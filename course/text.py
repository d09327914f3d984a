"""Top-P's and adaptive gating's difficulty claims on text (``python -m course text``).

Chapters 4 and 5 ask "do harder inputs get more experts?" on token tasks whose difficulty is
the task, and on the known-answer testbed. Here the inputs are the course's text (byte level,
``byte_corpus``) and a position's difficulty is how badly a model predicts its next byte: the
held-out positions are cut into quintiles of their loss under the same seed's **top-2** model
(one grouping for every router of that seed, fixed before any of them is measured).

Every router runs with its paper's own losses (``router.paper_losses``: balance 1e-2 counted
as its paper counts, no z-loss; top-p adds its dynamic loss 1e-4), dropless, from the same
initial weights on the same batches (chapter 6's ``build_model`` and ``BatchStream``): top-2,
top-2 without renormalization (adaptive gating's control), top-p 0.4 and adaptive gating 0.1.
Measured on chapter 6's held-out windows: loss, experts per token (mean, per layer, per loss
quintile) and, every ``track_every`` steps, experts per token over training.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from course import common, testbed
from course.common import (
    DistinctSeeds,
    add_experiment_args,
    add_setup_args,
    load_json,
    set_threads,
    setup_from_args,
    write_csv,
)
from course.gw import eval_batch
from minimoe.analysis import ExpertsPerTokenTracker, RoutingRecorder
from minimoe.cli import non_negative_int, write_json
from minimoe.data import BYTE_VOCAB_SIZE, ByteCorpus, byte_corpus, lm_batches
from minimoe.model import TinyTransformer
from minimoe.routing import Router
from minimoe.train import TrainConfig, train

# the testbed's routers by the same names (top-1 left out)
ROUTERS: dict[str, Router] = {
    name: testbed.ROUTERS[name] for name in ("top-2", "top-2 raw", "top-p 0.4", "adaptive 0.1")
}
REFERENCE = "top-2"  # its per-position loss defines the difficulty quintiles
QUINTILES = 5


@dataclass
class TextSetup(common.Setup):
    """Chapter 6's model, data and held-out windows, always dropless."""

    capacity_factor: ClassVar[None] = None  # no capacity limit: the papers' setting
    block_size: int = 32
    eval_windows: int = 512  # held-out windows of block_size bytes
    track_every: int = 50  # experts per token on the held-out windows, every this many steps


@torch.no_grad()
def position_losses_and_routing(
    model: nn.Module, batch: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """Per held-out position: the next-byte loss (T,), and experts per token per layer (L, T)."""
    model.eval()
    with RoutingRecorder(model) as rec:
        logits = model(idx=batch["idx"]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
    counts = torch.stack([rec.routing(i).expert_counts.float() for i in range(len(rec))])
    return loss, counts


def quintiles(loss: Tensor) -> Tensor:
    """(T,) 0 (easiest fifth of the positions) to QUINTILES - 1 (hardest), by rank of ``loss``."""
    rank = loss.argsort().argsort()
    return rank * QUINTILES // len(loss)


def build_model(setup: TextSetup, **moe) -> TinyTransformer:
    """The seed's draw of the model, the same for every router; ``moe``: MoEConfig fields."""
    torch.manual_seed(setup.seed)
    init = TinyTransformer(setup.model_config(BYTE_VOCAB_SIZE, setup.block_size)).state_dict()
    model = TinyTransformer(setup.model_config(BYTE_VOCAB_SIZE, setup.block_size, **moe))
    model.load_state_dict(init, strict=False)  # a router's own state (a bias) keeps its zeros
    return model.to(setup.device)


def run(
    setup: TextSetup,
    corpus: ByteCorpus,
    name: str,
    difficulty: Tensor | None = None,
    progress: bool = False,
) -> tuple[dict, Tensor]:
    """Train one router (its paper's losses, dropless) and measure it on the held-out windows;
    ``difficulty``: the quintile of every held-out position (default: this run's own losses).
    Returns the measurements and the loss of every held-out position."""
    router = ROUTERS[name]
    moe = {"router": router, **router.paper_losses}
    model = build_model(setup, **moe)
    held_out = eval_batch(corpus, setup.block_size, setup.eval_windows)
    tracker = ExpertsPerTokenTracker(held_out, every=setup.track_every)
    tracker(0, model)
    config = TrainConfig(steps=setup.steps, lr=setup.lr, seed=setup.seed, progress=progress)
    start = time.perf_counter()
    batches = lm_batches(corpus, setup.batch_size, setup.block_size)  # the trainer's generator
    history = train(model, batches, config, callback=tracker)
    seconds = time.perf_counter() - start
    loss, counts = position_losses_and_routing(model, held_out)
    groups = quintiles(loss) if difficulty is None else difficulty
    ept = counts.mean(0)  # (T,) mean over layers
    record = {
        "router": name,
        "seed": setup.seed,
        "seconds": seconds,
        "final_train_loss": statistics.fmean(history.loss[-50:]),
        "val_loss": loss.mean().item(),
        "experts_per_token": ept.mean().item(),
        "per_layer": counts.mean(1).tolist(),
        "by_quintile": [ept[groups == q].mean().item() for q in range(QUINTILES)],
        "loss_by_quintile": [loss[groups == q].mean().item() for q in range(QUINTILES)],
        "trajectory": {
            "steps": tracker.steps,
            "mean": [statistics.fmean(layers) for layers in tracker.per_layer],
        },
    }
    return record, loss


def compare(setup: TextSetup, names: list[str], seeds: list[int], progress: bool = False) -> dict:
    """Every router for every seed; the quintiles of a seed are its top-2 model's."""
    corpus = byte_corpus()
    runs = []
    for seed in seeds:
        seed_setup = replace(setup, seed=seed)
        reference, reference_loss = run(seed_setup, corpus, REFERENCE, progress=progress)
        difficulty = quintiles(reference_loss)
        for name in names:
            if name == REFERENCE:
                r = reference
            else:
                r, _ = run(seed_setup, corpus, name, difficulty, progress)
            runs.append(r)
            print(
                f"{name:>13} seed {seed}: val loss {r['val_loss']:.4f}, experts per token "
                f"{r['experts_per_token']:.2f}, by difficulty quintile "
                + " ".join(f"{v:.2f}" for v in r["by_quintile"])
                + f" ({r['seconds']:.0f} s)",
                flush=True,
            )
    return {"setup": asdict(setup), "runs": runs}


def per_seed(results: dict, router: str, key: str) -> list:
    """``key`` of every seed's run of ``router``, in seed order."""
    return [
        r[key] for r in sorted(results["runs"], key=lambda r: r["seed"]) if r["router"] == router
    ]


def table(results: dict) -> list[dict]:
    """One row per run: its scalar numbers and experts per token per difficulty fifth."""
    scalars = ("router", "seed", "val_loss", "final_train_loss", "experts_per_token", "seconds")
    return [
        {k: r[k] for k in scalars}
        | {f"ept_fifth{q + 1}": v for q, v in enumerate(r["by_quintile"])}
        | {f"ept_layer{i}": v for i, v in enumerate(r["per_layer"])}
        for r in results["runs"]
    ]


def load_results(path: str | Path | None = None) -> dict:
    """Results written by the command; by default the cached ``data/text/results.json``."""
    return load_json(path, "text/results.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("text", help="top-p and adaptive gating on text: experts by difficulty")
    add_setup_args(p, TextSetup())
    p.add_argument(
        "--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2], action=DistinctSeeds
    )
    p.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(ROUTERS))
    add_experiment_args(p, out="runs/text")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> dict:
    set_threads(args)
    setup = setup_from_args(TextSetup, args, args.seeds[0])
    results = compare(setup, args.routers, args.seeds, progress=not args.no_progress)
    write_json(args.out / "results.json", results)
    write_csv(args.out / "results.csv", table(results))
    print(f"wrote {args.out / 'results.json'} and results.csv")
    return results

"""The known-answer testbed: every router on ``make_mixture_task`` (``python -m course testbed``).

A sample at level m needs the m experts that learned its m functions (``minimoe.data``): level 1
is the easy part, levels 2-3 the hard part. One MoE layer on the raw input
(``MoERegressor``), dropless, each router with its paper's own losses (``with_paper_losses``:
balance 1e-2 counted as its paper counts, no z-loss; top-p adds its dynamic loss 1e-4).

The control comes first: top-1 (Switch: no renormalization, so the router gets a gradient)
against top-2 at the same size. If the hard part does not separate them beyond seed noise, or
the easy part does, the testbed cannot judge a router and no claim should be read off it.
Then top-p (p=0.4) and adaptive gating (threshold 0.1), with top-2 without renormalization
as adaptive's control (adaptive's weights are not renormalized either); ``--sweep`` adds
top-p at the other p of the paper's sweep.

Measured on a test set of the same functions (another sample seed), per level: the error
relative to the targets' variance, experts per token, and coverage: the share of a sample's
needed experts among those it got, where the expert of function c is the one that most of
c's level-1 samples pick first (read it beside ``distinct_experts``: a router that sends
everything to one expert "covers" every level-1 sample).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from course.common import (
    DistinctSeeds,
    add_experiment_args,
    add_setup_args,
    load_json,
    set_threads,
    setup_from_args,
    write_csv,
)
from minimoe.analysis import first_choice
from minimoe.cli import non_negative_int, write_json
from minimoe.data import MixtureTask, make_mixture_task, toy_batches
from minimoe.layer import MoEConfig
from minimoe.model import MoERegressor
from minimoe.routing import Adaptive, Router, TopK, TopP
from minimoe.train import TrainConfig, train

LEVELS = (1, 2, 3)
TEST_SAMPLE_SEED = 1  # the test set; training sets use 1000 + seed

ROUTERS: dict[str, Router] = {
    "top-1": TopK(k=1, renormalize=False),
    "top-2": TopK(k=2),
    "top-2 raw": TopK(k=2, renormalize=False),
    "top-p 0.4": TopP(p=0.4),
    "adaptive 0.1": Adaptive(threshold=0.1),
}
SWEEP_PS = (0.1, 0.2, 0.3, 0.5, 0.7)  # with ROUTERS' 0.4: the paper's p sweep, as "top-p <p>"


def router_named(name: str) -> Router:
    """``ROUTERS[name]``, or ``TopP(p)`` for a name "top-p <p>" (the sweep)."""
    if name in ROUTERS:
        return ROUTERS[name]
    head, _, value = name.partition(" ")
    if head == "top-p":
        try:
            return TopP(p=float(value))
        except ValueError as err:
            raise ValueError(f"router {name!r}: {err}") from None
    raise ValueError(f"unknown router {name!r}; choose from {list(ROUTERS)} or 'top-p <p>'")


@dataclass
class TestbedSetup:
    """Sizes where routing matters (see the module docstring): 8 functions of hidden width 8,
    8 experts of width 32; one expert fits one function, not every mixture of them."""

    num_experts: int = 8
    d_hidden: int = 32
    n_train: int = 16384
    n_test: int = 4096
    batch_size: int = 256
    steps: int = 2000
    lr: float = 3e-3
    task_seed: int = 0  # the functions; the seed of a run sets its samples and weights
    seed: int = 0

    def tasks(self) -> tuple[MixtureTask, MixtureTask]:
        train_set = make_mixture_task(
            self.n_train, seed=self.task_seed, sample_seed=1000 + self.seed
        )
        test_set = make_mixture_task(self.n_test, seed=self.task_seed, sample_seed=TEST_SAMPLE_SEED)
        return train_set, test_set

    def model(self, router: Router, task: MixtureTask) -> MoERegressor:
        torch.manual_seed(self.seed)
        d = task.x.shape[1]
        moe = MoEConfig(
            d_model=d,
            d_hidden=self.d_hidden,
            num_experts=self.num_experts,
            router=router,
            capacity_factor=None,
        )
        return MoERegressor(d, task.y.shape[1], moe.with_paper_losses())


@torch.no_grad()
def measure(model: MoERegressor, test: MixtureTask) -> dict:
    """Per level: relative error, experts per token and coverage of the needed experts."""
    model.eval()
    out = model(test.x)
    routing = out.layers[0].routing
    err = (out.logits - test.y).pow(2).mean(1)  # (N,)
    first = first_choice(routing)  # (N,) the expert each sample trusts most
    one = test.level == 1
    funcs = test.member[one].float().argmax(1)  # (N1,) the function of each level-1 sample
    if funcs.unique().numel() < test.member.shape[1]:
        raise ValueError("the test set needs level-1 samples of every function: raise n_test")
    expert_of = torch.stack(
        [first[one][funcs == c].mode().values for c in range(test.member.shape[1])]
    )  # (C,) the expert of each function
    needed = torch.zeros_like(routing.mask)  # (N, E) the experts of each sample's functions
    rows, cols = test.member.nonzero(as_tuple=True)
    needed[rows, expert_of[cols]] = True
    covered = (routing.mask & needed).sum(1) / test.level  # (N,) in [0, 1]
    per_level = {}
    counts = routing.expert_counts  # (N,) experts per sample
    for m in LEVELS:
        at = test.level == m
        per_level[str(m)] = {  # str: the keys JSON keeps
            "rel_error": (err[at].mean() / test.y[at].var(0).mean()).item(),
            "experts_per_token": counts[at].float().mean().item(),
            "multi_expert_share": (counts[at] > 1).float().mean().item(),
            "coverage": covered[at].mean().item(),
        }
    return {
        "levels": per_level,
        "distinct_experts": int(expert_of.unique().numel()),  # < C: functions share an expert
    }


def run(name: str, setup: TestbedSetup, progress: bool = False) -> dict:
    """Train one router on one seed and measure it; experts per token early and late."""
    train_set, test_set = setup.tasks()
    model = setup.model(router_named(name), train_set)
    start = time.perf_counter()
    config = TrainConfig(steps=setup.steps, lr=setup.lr, seed=setup.seed, progress=progress)
    history = train(model, toy_batches(train_set, setup.batch_size), config)
    tenth = max(1, setup.steps // 10)
    epr = [layers[0] for layers in history.experts_per_token]
    return {
        "router": name,
        "seed": setup.seed,
        **measure(model, test_set),
        "experts_per_token_first_tenth": statistics.fmean(epr[:tenth]),
        "experts_per_token_last_tenth": statistics.fmean(epr[-tenth:]),
        "seconds": time.perf_counter() - start,
    }


def compare(setup: TestbedSetup, names: list[str], seeds: list[int], progress: bool) -> dict:
    runs = []
    for seed in seeds:
        for name in names:
            r = run(name, replace(setup, seed=seed), progress)
            runs.append(r)
            levels = "  ".join(
                f"L{m} err {v['rel_error']:.3f} e/t {v['experts_per_token']:.2f}"
                for m, v in r["levels"].items()
            )
            print(f"{name:>12} seed {seed}: {levels}  ({r['seconds']:.0f} s)", flush=True)
    return {"setup": asdict(setup), "runs": runs}


def load_results(path: str | Path | None = None) -> dict:
    """Results written by the command; by default the cached data/testbed/results.json."""
    return load_json(path, "testbed/results.json")


def table(results: dict) -> list[dict]:
    """One row per router, seed and level."""
    return [
        {"router": r["router"], "seed": r["seed"], "level": int(m), **v}
        for r in results["runs"]
        for m, v in r["levels"].items()
    ]


def per_seed(results: dict, router: str, key: str, level: int) -> list[float]:
    """``key`` of ``router`` at ``level``, one value per seed (in the order of the runs)."""
    return [r["levels"][str(level)][key] for r in results["runs"] if r["router"] == router]


def level_shares(results: dict) -> dict[int, float]:
    """Each level's share of the test set the runs were measured on."""
    setup = results["setup"]
    test = make_mixture_task(setup["n_test"], seed=setup["task_seed"], sample_seed=TEST_SAMPLE_SEED)
    return {m: (test.level == m).float().mean().item() for m in LEVELS}


def overall(results: dict, router: str, key: str) -> list[float]:
    """``key`` over all test inputs (levels weighted by their share), one value per seed."""
    share = level_shares(results)
    by_level = [per_seed(results, router, key, m) for m in LEVELS]
    return [sum(share[m] * v for m, v in zip(LEVELS, seed)) for seed in zip(*by_level)]


def paired(results: dict, a: str, b: str, metric: str = "rel_error") -> dict[int, list[float]]:
    """Per level, ``metric`` of router ``a`` minus router ``b``, one difference per seed."""
    by = {(r["router"], r["seed"]): r["levels"] for r in results["runs"]}
    seeds = sorted({s for (n, s) in by if n == a} & {s for (n, s) in by if n == b})
    if not seeds:
        raise ValueError(f"no seed has both {a!r} and {b!r}")
    return {
        m: [by[(a, s)][str(m)][metric] - by[(b, s)][str(m)][metric] for s in seeds] for m in LEVELS
    }


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("testbed", help="every router on the known-answer mixture testbed")
    add_setup_args(p, TestbedSetup())
    p.add_argument(
        "--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2], action=DistinctSeeds
    )
    p.add_argument(
        "--routers",
        nargs="+",
        default=list(ROUTERS),
        help=f"from {list(ROUTERS)}, or 'top-p <p>' (default: %(default)s)",
    )
    p.add_argument(
        "--sweep", action="store_true", help=f"add top-p at p = {', '.join(map(str, SWEEP_PS))}"
    )
    add_experiment_args(p, out="runs/testbed")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> dict:
    set_threads(args)
    setup = setup_from_args(TestbedSetup, args, args.seeds[0])
    names = list(args.routers) + ([f"top-p {p}" for p in SWEEP_PS] if args.sweep else [])
    for name in names:
        router_named(name)  # refuse a bad name before training anything
    results = compare(setup, names, args.seeds, progress=not args.no_progress)
    write_json(args.out / "results.json", results)
    write_csv(args.out / "results.csv", table(results))
    print(f"wrote {args.out / 'results.json'} and results.csv")
    return results

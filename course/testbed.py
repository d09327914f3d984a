"""The known-answer testbed: every router on ``make_mixture_task`` (``python -m course testbed``).

A sample at level m needs the m experts that learned its m functions (``minimoe.data``): level 1
is the easy part, levels 2-3 the hard part. One MoE layer on the raw input
(``MoERegressor``), dropless, each router with its paper's own losses (``with_paper_losses``:
balance 1e-2 counted as its paper counts, no z-loss; top-p adds its dynamic loss 1e-4).

The control comes first: top-1 (Switch: no renormalization, so the router gets a gradient)
against top-2 at the same size. If the hard part does not separate them beyond seed noise, or
the easy part does, the testbed cannot judge a router and no claim should be read off it.
Then top-p (p=0.4, and the rest of the paper's p sweep) and adaptive gating (threshold 0.1),
with top-2 without renormalization as adaptive's control (adaptive's weights are not
renormalized either).

Two variants of the task (``Testbed``, ``TestbedDirichlet``): a level-m input weighs its m
functions equally (1/m each), so an ideal router's probabilities are 1/m each and top-p keeps
all m only for p > (m - 1) / m: the equal weights alone decide where a p sweep turns. The
Dirichlet variant draws each input's weights, so no threshold is favoured.

Measured on a test set of the same functions (another sample seed), per level m
(``<measure>@m``) and over all inputs: the error relative to the targets' variance, experts
per token, the share of inputs on more than one expert, and coverage: the share of an input's
needed experts among those it got, where the expert of function c is the one that most of
c's level-1 samples pick first (read it beside ``distinct_experts``: a router that sends
everything to one expert "covers" every level-1 sample).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import cached_property

import torch

from course import harness
from course.harness import Experiment, Run
from minimoe.analysis import first_choice
from minimoe.data import MixtureTask, make_mixture_task, toy_batches
from minimoe.layer import MoEConfig
from minimoe.model import MoERegressor
from minimoe.routing import Adaptive, TopK, TopP
from minimoe.train import History

LEVELS = (1, 2, 3)
TEST_SAMPLE_SEED = 1  # the test set; training sets use 1000 + seed
SWEEP_PS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7)  # the paper's p sweep, as "top-p <p>"

RUNS: dict[str, Run] = {
    "top-1": Run(TopK(k=1, renormalize=False)),
    "top-2": Run(TopK(k=2)),
    "top-2 raw": Run(TopK(k=2, renormalize=False)),
    "adaptive 0.1": Run(Adaptive(threshold=0.1)),
} | {f"top-p {p}": Run(TopP(p=p)) for p in SWEEP_PS}
ROUTERS = {name: run.router for name, run in RUNS.items()}  # the same routers, by run name


@dataclass
class TestbedSetup:
    """Sizes where routing matters (see the module docstring): 8 functions of hidden width 8,
    8 experts of width 32; one expert fits one function, not every mixture of them."""

    num_experts: int = 8
    d_hidden: int = 32
    n_train: int = 16384
    n_test: int = 4096
    batch_size: int = 256
    steps: int = 4000
    lr: float = 3e-3
    lr_schedule: str = "cosine"  # ends where the runs stop improving (the converged rule)
    task_seed: int = 0  # the functions; the seed of a run sets its samples and weights
    mixing: str = "equal"  # "equal" | "dirichlet": how a level-m input weighs its functions
    seed: int = 0
    device: str = "cpu"

    def train_set(self, seed: int | None = None) -> MixtureTask:
        seed = self.seed if seed is None else seed
        return make_mixture_task(self.n_train, sample_seed=1000 + seed, **self._task())

    def test_set(self) -> MixtureTask:
        """The same test samples for every seed."""
        return make_mixture_task(self.n_test, sample_seed=TEST_SAMPLE_SEED, **self._task())

    def tasks(self, seed: int | None = None) -> tuple[MixtureTask, MixtureTask]:
        return self.train_set(seed), self.test_set()

    def _task(self) -> dict:
        return {"seed": self.task_seed, "mixing": self.mixing}

    def moe(self, d_model: int) -> MoEConfig:
        return MoEConfig(
            d_model=d_model, d_hidden=self.d_hidden, num_experts=self.num_experts,
            capacity_factor=None,
        )  # fmt: skip


@torch.no_grad()
def measure(model: MoERegressor, test: MixtureTask) -> dict:
    """Per level: relative error, experts per token and coverage of the needed experts (the
    model runs on its own device; the statistics are taken on the CPU, where the test set is)."""
    model.eval()
    out = model(test.x.to(next(model.parameters()).device))
    routing = out.layers[0].routing.to("cpu")  # beside the test set's labels, on the CPU
    err = (out.logits.cpu() - test.y).pow(2).mean(1)  # (N,)
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


def flat(measured: dict, test: MixtureTask) -> dict[str, float]:
    """``measure``'s numbers as the harness keeps them: ``<key>@<level>`` per level, and
    ``<key>`` over every test input (the levels weighted by their share of the test set)."""
    share = {m: (test.level == m).float().mean().item() for m in LEVELS}
    out: dict[str, float] = {"distinct_experts": float(measured["distinct_experts"])}
    for key in measured["levels"]["1"]:
        by_level = {m: measured["levels"][str(m)][key] for m in LEVELS}
        out[key] = sum(share[m] * v for m, v in by_level.items())
        out |= {f"{key}@{m}": v for m, v in by_level.items()}
    return out


class Testbed(Experiment):
    """Every router on the testbed with equal mixture weights (chapters 4-5)."""

    name = "testbed"
    help = "every router on the known-answer mixture testbed (equal mixture weights)"
    setup_class = TestbedSetup
    runs = RUNS
    eval_every = 200

    @cached_property
    def test_set(self) -> MixtureTask:
        return self.setup.test_set()

    def base_moe(self) -> MoEConfig:
        return self.setup.moe(self.test_set.x.shape[1])

    def data(self, seed: int):
        return toy_batches(self.setup.train_set(seed), self.setup.batch_size), self.test_set

    def model(self, moe: MoEConfig, seed: int) -> MoERegressor:
        torch.manual_seed(seed)
        return MoERegressor(moe.d_model, self.test_set.y.shape[1], moe)

    def evaluate(self, model: MoERegressor, held_out: MixtureTask) -> dict[str, float]:
        return flat(measure(model, held_out), held_out)

    def extra(self, model, held_out, history: History, record) -> dict:
        tenth = max(1, len(history.experts_per_token) // 10)
        epr = [layers[0] for layers in history.experts_per_token]
        return {
            "experts_per_token_first_tenth": statistics.fmean(epr[:tenth]),
            "experts_per_token_last_tenth": statistics.fmean(epr[-tenth:]),
        }


class TestbedDirichlet(Testbed):
    """The same routers where each input's mixture weights are drawn (flat Dirichlet)."""

    name = "testbed_dirichlet"
    help = "every router on the known-answer testbed with drawn (Dirichlet) mixture weights"

    def __init__(self, setup: TestbedSetup | None = None) -> None:
        super().__init__(setup if setup is not None else TestbedSetup(mixing="dirichlet"))


EXPERIMENTS = (Testbed, TestbedDirichlet)


def load(mixing: str = "equal", path=None) -> harness.Results:
    """The cached results (``data/testbed`` or ``data/testbed_dirichlet``), checked."""
    exp = Testbed() if mixing == "equal" else TestbedDirichlet()
    return harness.load(exp, path)


def add_parser(sub) -> None:
    for cls in EXPERIMENTS:
        cls().add_parser(sub)

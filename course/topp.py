"""Chapter 4: top-2 vs top-p on the graded token tasks (``python -m course topp``), on the
experiment harness.

A 3-layer ``TinyTransformer`` learns ``make_multitask`` (copy < reverse < sort < add: the task
index is the difficulty level). For one seed every run starts from the same weights and sees
the same batches; the learning rate decays (cosine) to zero, so a run ends where it stops
improving. Every router runs with its paper's own losses (balance 1e-2 counted as its paper
counts, no z-loss; top-p adds its dynamic loss, beta 1e-4) unless its name says otherwise.

Measured on a held-out probe of each seed (``make_probe``: samples of another seed, none of
which occurs in that seed's training set), every ``eval_every`` steps: the answer loss, quality
per task (teacher-forced argmax: token accuracy and exact match of whole answers) and experts
per token per layer, per task and on answer positions. Padding positions carry no loss and are
left out of every routing statistic.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from course import harness, stats, testbed
from course.harness import Experiment, Run
from minimoe.analysis import RoutingRecorder, experts_per_token_by_group
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
from minimoe.layer import MoEConfig
from minimoe.model import ModelConfig, TinyTransformer
from minimoe.routing import TopP
from minimoe.train import History

MAX_LEN = 6  # longest operand: sequences of seq_len(6) = 22 tokens

# the testbed's routers by the same names, each with its paper's losses, and the ablations the
# chapter discusses: the dynamic loss off and 100 times the paper's, the course's router z-loss
ROUTER = testbed.ROUTERS
RUNS: dict[str, Run] = {
    "top-2": Run(ROUTER["top-2"]),
    "top-2 raw": Run(ROUTER["top-2 raw"]),  # top-p's control: no renormalization either
    "top-p 0.4": Run(ROUTER["top-p 0.4"]),  # the paper's p and beta = 1e-4
    "top-p 0.4 beta=0": Run(TopP(p=0.4, dynamic_coef=0.0)),
    "top-p 0.4 beta=0.01": Run(TopP(p=0.4, dynamic_coef=1e-2)),
    "top-p 0.4 z=0.001": Run(ROUTER["top-p 0.4"], moe={"z_coef": 1e-3}),
    "top-p 0.2": Run(ROUTER["top-p 0.2"]),
    "top-p 0.7": Run(ROUTER["top-p 0.7"]),
}


@dataclass
class TopPSetup:
    """The chapter's scale: 3 layers, d_model 64, 8 SwiGLU experts of width 128, dropless."""

    n_layers: int = 3
    d_model: int = 64
    d_hidden: int = 128
    num_experts: int = 8
    n_train: int = 8192
    n_probe: int = 512  # held-out probe samples (seed + 1, none in the training set)
    batch_size: int = 32
    steps: int = 600
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    seed: int = 0
    device: str = "cpu"


@dataclass
class Probe:
    """Held-out samples with each token's task as a group label, flattened like the model's
    tokens: ``task`` on every real token, ``answer_task`` only on the positions that predict an
    answer token (from "=" on); -1 elsewhere (left out)."""

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

    def batch(self, device: str | torch.device = "cpu") -> Batch:
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


def training_data(setup: TopPSetup, seed: int) -> MultiTaskData:
    """The training samples of ``seed``."""
    return make_multitask(setup.n_train, max_len=MAX_LEN, seed=seed)


def make_probe(setup: TopPSetup, seed: int) -> Probe:
    """The probe of ``seed``: ``setup.n_probe`` samples of seed + 1 that its training set lacks."""
    return Probe.make(setup.n_probe, seed=seed + 1, exclude=training_data(setup, seed))


# ---- the measures ------------------------------------------------------------------------


def real_token_mean(per_group: dict[int, float], counts: dict[int, int]) -> float:
    """Mean over real tokens of per-group means (groups as the probe's task labels; -1 = padding)."""
    groups = [g for g in per_group if g >= 0]
    return sum(per_group[g] * counts[g] for g in groups) / sum(counts[g] for g in groups)


def task_quality(logits: Tensor, probe: Probe) -> dict[str, float]:
    """Per task, teacher-forced: ``token_accuracy@<task>`` on answer positions and
    ``exact_match@<task>`` (every answer token right); and both as the mean over tasks."""
    pred = logits.argmax(-1).cpu()  # (N, L)
    scored = probe.data.answer_mask  # (N, L)
    right = (pred == probe.data.targets) & scored
    out = {}
    for t, name in enumerate(TASKS):
        rows = probe.data.task == t
        out[f"token_accuracy@{name}"] = right[rows].sum().item() / max(scored[rows].sum().item(), 1)
        out[f"exact_match@{name}"] = (right[rows] == scored[rows]).all(dim=1).float().mean().item()
    for key in ("token_accuracy", "exact_match"):
        out[key] = statistics.fmean(out[f"{key}@{name}"] for name in TASKS)
    return out


def routing_measures(layers: list, probe: Probe) -> dict[str, float]:
    """Experts per token of the probe's real tokens: ``experts_per_token`` (every layer sees the
    same tokens: the mean over layers), ``@layer<i>``, ``@<task>`` (mean over layers), and
    ``answer_experts_per_token@<task>`` on the answer positions alone."""
    out: dict[str, float] = {}
    for key, labels, answers in (
        ("experts_per_token", probe.task, False),
        ("answer_experts_per_token", probe.answer_task, True),
    ):
        counts = probe.counts(answers)
        groups = [experts_per_token_by_group(r, labels) for r in layers]  # per layer {task: ept}
        per_layer = [real_token_mean(g, counts) for g in groups]
        if not answers:
            out[key] = statistics.fmean(per_layer)
            out |= {f"{key}@layer{i}": v for i, v in enumerate(per_layer)}
        for t, name in enumerate(TASKS):
            out[f"{key}@{name}"] = statistics.fmean(g[t] for g in groups)
    return out


@torch.no_grad()
def measure(model: nn.Module, probe: Probe) -> dict[str, float]:
    """Every held-out measure of one model on the probe: ``loss`` (cross-entropy on the answer
    positions, nats per token), ``task_quality`` and ``routing_measures``."""
    model.eval()
    device = next(model.parameters()).device
    with RoutingRecorder(model) as rec:
        out = model(**probe.batch(device))
    layers = [rec.routing(i) for i in range(len(rec))]
    measures = task_quality(out.logits, probe) | routing_measures(layers, probe)
    first = {k: measures.pop(k) for k in ("experts_per_token", "exact_match", "token_accuracy")}
    return {"loss": out.loss.item()} | first | measures


# ---- the experiment ------------------------------------------------------------------------


class TokenTasks(Experiment):
    """Top-2, its unrenormalized control, and top-p with the chapter's ablations."""

    name = "topp"
    help = "chapter 4: top-2 vs top-p on the graded token tasks (dynamic loss, z-loss, p)"
    setup_class = TopPSetup
    runs = RUNS
    eval_every = 50

    def __init__(self, setup: TopPSetup | None = None) -> None:
        super().__init__(setup)
        self._probes: dict[int, Probe] = {}

    def base_moe(self) -> MoEConfig:
        s = self.setup
        return MoEConfig(d_model=s.d_model, d_hidden=s.d_hidden, num_experts=s.num_experts)

    def data(self, seed: int):
        s = self.setup
        return multitask_batches(training_data(s, seed), s.batch_size), self.probe(seed)

    def probe(self, seed: int) -> Probe:
        """``make_probe`` of ``seed``, made once."""
        if seed not in self._probes:
            self._probes[seed] = make_probe(self.setup, seed)
        return self._probes[seed]

    def model(self, moe: MoEConfig, seed: int) -> TinyTransformer:
        torch.manual_seed(seed)  # every run of a seed: the same weights (same shapes)
        s = self.setup
        config = ModelConfig(len(VOCAB), seq_len(MAX_LEN), n_layers=s.n_layers, n_heads=4, moe=moe)
        return TinyTransformer(config)

    def evaluate(self, model: nn.Module, held_out: Probe) -> dict[str, float]:
        return measure(model, held_out)

    def extra(self, model: nn.Module, held_out: Probe, history: History, record) -> dict:
        """Experts per token of the untrained model (step 0), per layer and task at the end
        (real tokens), and the mean training loss over the last 50 steps."""
        name, seed = self.current
        untrained = self.model(self.runs[name].moe_config(self.base_moe()), seed)
        untrained.to(self.setup.device)
        with torch.no_grad(), RoutingRecorder(untrained) as rec:
            untrained.eval()
            untrained(**held_out.batch(self.setup.device))
        start = [experts_per_token_by_group(rec.routing(i), held_out.task) for i in range(len(rec))]
        counts = held_out.counts()
        model.eval()
        with torch.no_grad(), RoutingRecorder(model) as rec:
            model(**held_out.batch(self.setup.device))
        end = [experts_per_token_by_group(rec.routing(i), held_out.task) for i in range(len(rec))]
        return {
            "experts_per_token_at_0": statistics.fmean(real_token_mean(g, counts) for g in start),
            "per_layer_task": [[g[t] for t in range(len(TASKS))] for g in end],
            "final_train_loss": statistics.fmean(history.loss[-50:]),
        }


def within_run(
    results: harness.Results, run: str, a: str, b: str, names: tuple[str, str]
) -> stats.Comparison:
    """Measure ``a`` minus measure ``b`` of one run (``experts_per_token@layer0`` against
    ``@layer2``, say), paired by seed (uncorrected), with how much that gap and each measure
    moved over the last fifth of training (the converged rule's drifts); a count, so no side
    is better."""
    seeds = results.seeds_of(run)
    gap, own = [], {a: [], b: []}
    for s in seeds:
        curves = {m: results.curve(run, s, m) for m in (a, b)}
        steps = sorted(curves[a])
        gap.append(stats.tail_drift(steps, [curves[a][t] - curves[b][t] for t in steps]))
        for m, c in curves.items():
            own[m].append(stats.tail_drift(steps, [c[t] for t in steps]))
    return stats.compare(
        results.values(run, a, seeds), results.values(run, b, seeds), names,
        f"{run}, {a.split('@')[0]}", drift=statistics.fmean(gap),
        run_drift=max((statistics.fmean(d) for d in own.values()), key=abs), lower_is_better=None,
    )  # fmt: skip


def experts_at(results: harness.Results, run: str, step: int) -> list[float]:
    """Experts per token of ``run`` at an evaluated ``step``, one value per seed; step 0 is the
    untrained model (kept in ``extra``)."""
    seeds = results.seeds_of(run)
    if step == 0:
        return [results.record(run, s)["extra"]["experts_per_token_at_0"] for s in seeds]
    return [results.curve(run, s, "experts_per_token")[step] for s in seeds]


def family(results: harness.Results, setup: TopPSetup) -> dict[str, stats.Comparison]:
    """The chapter's comparisons on the token tasks, by name, uncorrected: the count and its
    fall over training, by task and by layer, quality against top-2, the losses' effect on the
    count, and p. Chapter 4 and its deeper part (4b) both correct the whole family together
    (``stats.holm``), so a verdict reads the same in either."""
    count = {"lower_is_better": None}  # experts per token: no side is better
    top = setup.n_layers - 1

    def over_time(run: str, a: int, b: int) -> stats.Comparison:
        at = [experts_at(results, run, step) for step in (a, b)]
        names = (f"step {a}", f"step {b}")
        return stats.compare(*at, names, f"{run}, experts per token", lower_is_better=None)

    def by_task(run: str, a: str, b: str) -> stats.Comparison:
        key = "experts_per_token"
        return within_run(results, run, f"{key}@{a}", f"{key}@{b}", (a, b))

    def by_layer(run: str) -> stats.Comparison:
        key = "experts_per_token"
        names = ("layer 0", f"layer {top}")
        return within_run(results, run, f"{key}@layer0", f"{key}@layer{top}", names)

    return {
        # the count, and the count over training
        "count vs top-2": results.compare("top-p 0.4", "top-2", "experts_per_token", **count),
        "first 100 steps": over_time("top-p 0.4", 100, 0),
        "after step 100": over_time("top-p 0.4", setup.steps, 100),
        "after step 100, beta=0.01": over_time("top-p 0.4 beta=0.01", setup.steps, 100),
        # by task and by layer
        "sort vs copy": by_task("top-p 0.4", "sort", "copy"),
        "add vs copy": by_task("top-p 0.4", "add", "copy"),
        "layers": by_layer("top-p 0.4"),
        "layers, beta=0.01": by_layer("top-p 0.4 beta=0.01"),
        # quality against top-2 and its control
        "loss vs top-2": results.compare("top-p 0.4", "top-2", "loss"),
        "loss vs top-2 raw": results.compare("top-p 0.4", "top-2 raw", "loss"),
        "sort vs top-2": results.compare(
            "top-p 0.4", "top-2", "exact_match@sort", lower_is_better=False
        ),
        "loss beta=0.01 vs top-2": results.compare("top-p 0.4 beta=0.01", "top-2", "loss"),
        # the dynamic loss and the z-loss
        "count beta=0": results.compare(
            "top-p 0.4 beta=0", "top-p 0.4", "experts_per_token", **count
        ),
        "count beta=0.01": results.compare(
            "top-p 0.4 beta=0.01", "top-p 0.4", "experts_per_token", **count
        ),
        "count z": results.compare("top-p 0.4 z=0.001", "top-p 0.4", "experts_per_token", **count),
        "loss z": results.compare("top-p 0.4 z=0.001", "top-p 0.4", "loss"),
        # two more p
        "loss p=0.2 vs top-2": results.compare("top-p 0.2", "top-2", "loss"),
        "loss p=0.7 vs top-2": results.compare("top-p 0.7", "top-2", "loss"),
    }


def load(path=None) -> harness.Results:
    """The cached results (``data/topp``), checked against the declared runs."""
    return harness.load(TokenTasks(), path)


def add_parser(sub) -> None:
    TokenTasks().add_parser(sub)

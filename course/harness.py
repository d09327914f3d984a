"""One experiment harness for every chapter: declared runs, one results format, paired statistics.

A chapter's experiment subclasses ``Experiment`` and declares only what is its own: its setup (a
dataclass), its runs (name -> ``Run``: a router spec and a loss recipe), its seeds, how a model
and its data are built and what is measured on held-out data. The harness trains every (run,
seed), evaluates the held-out measures every ``eval_every`` steps (the curve), and writes one
results format, ``results.json``:

    {"format", "experiment", "command", "versions", "setup", "seeds",
     "runs": {name: {"moe": MoEConfig.to_dict(), "train": TrainConfig changes}},
     "results": [{"run", "seed", "measures": {name: float}, "curve": {"step": [...], ...},
                  "train_loss": [every len // 100-th step's], "seconds", "extra": {...}}]}

The router is saved as data (``router_to_dict``), never by a command-line flag, so renaming a
flag breaks no cache; ``load`` refuses a file whose runs differ from the declared ones.
``Results.family`` judges a chapter's comparisons with ``course.stats``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import minimoe
from course import stats
from course.common import (
    DATA,
    DistinctSeeds,
    add_experiment_args,
    add_setup_args,
    set_threads,
    write_csv,
)
from minimoe.cli import non_negative_int
from minimoe.layer import MoEConfig
from minimoe.routing import Router
from minimoe.train import History, TrainConfig, train

FORMAT = "minimoe-course-results/1"
LOSS_RECIPES = ("paper", "course")
EXACT = 1e-3  # a live re-run against the cache where both did the same arithmetic: the last digits


@dataclass(frozen=True)
class Run:
    """One arm: the router, and the loss recipe its MoE layers train with.

    ``losses="paper"``: the router's paper's own coefficients (``MoEConfig.with_paper_losses``);
    ``"course"``: MoEConfig's defaults (balance 1e-2, z-loss 1e-3). ``moe`` changes any other
    MoEConfig field after that (``{"z_coef": 1e-3}``); ``train`` changes TrainConfig fields.
    """

    router: Router
    losses: str = "paper"
    moe: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    # a run that fine-tunes another: it starts from that run's model at step
    # ``Experiment.continue_at()``, with a fresh optimizer, on the batches that run sees from
    # there, its learning-rate schedule continued; its curve counts steps from the start
    continues: str | None = None

    def __post_init__(self) -> None:
        if self.losses not in LOSS_RECIPES:
            raise ValueError(f"losses must be one of {LOSS_RECIPES}, got losses={self.losses!r}")

    def moe_config(self, base: MoEConfig) -> MoEConfig:
        """``base`` with this run's router, loss recipe and changes."""
        config = replace(base, router=self.router)
        if self.losses == "paper":
            config = config.with_paper_losses()
        return replace(config, **self.moe)


class Experiment:
    """A chapter's experiment; subclasses set the class attributes and the four methods.

    Runs are trained in their declared order, so a run that another ``continues`` comes first
    (its snapshot is kept for the seed; without it, its first steps are trained again)."""

    name: str  # results live in data/<name>/
    setup_class: type  # a dataclass with a ``seed`` field and a ``device`` field
    runs: dict[str, Run]
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    eval_every: int = 100  # steps between held-out evaluations (the curve)
    # a continuing run's curve counts steps from its source's start (the same task trained
    # on), or, True, from its own first step (fine-tuning on another task: the converged rule
    # then reads the last fifth of the fine-tuning)
    curve_from_branch: bool = False
    help: str = ""

    def __init__(self, setup: Any | None = None) -> None:
        self.setup = setup if setup is not None else self.setup_class()
        self._snapshots: dict[tuple[str, int, int], dict] = {}  # (run, seed, step) -> weights
        self.current: tuple[str, int] | None = None  # the (run, seed) being trained

    # ---- what a chapter declares ---------------------------------------------------------

    def base_moe(self) -> MoEConfig:
        """The MoEConfig every run starts from (sizes, capacity)."""
        raise NotImplementedError

    def data(self, seed: int) -> tuple[Callable[[torch.Generator], dict], Any]:
        """The training batches (``get_batch(generator)``) and the held-out set of one seed."""
        raise NotImplementedError

    def model(self, moe: MoEConfig, seed: int) -> nn.Module:
        """A model with MoE layers of config ``moe``, its weights drawn from ``seed``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, held_out: Any) -> dict[str, float]:
        """Held-out measures (floats): the final ones, and every ``eval_every`` steps the curve
        the converged rule reads."""
        raise NotImplementedError

    def batches(self, get_batch: Any, model: nn.Module) -> Callable[[torch.Generator], dict]:
        """The training batches of the run being trained (``current``) from what ``data`` gave,
        once its model is built: that itself by default (a curriculum, which ranks the samples
        with the model, builds its sampler here)."""
        return get_batch

    def build(self, run: Run, seed: int) -> nn.Module:
        """Run ``run``'s model before training: ``model`` with its MoEConfig (a chapter whose
        runs differ in more than the MoEConfig overrides this)."""
        return self.model(run.moe_config(self.base_moe()), seed)

    def recorder(self, name: str) -> Callable[[int, nn.Module, Any], None] | None:
        """A per-step training callback (``train``'s ``callback``) for run ``name``, handed to
        ``extra`` afterwards as ``record``; none by default."""
        return None

    def extra(self, model: nn.Module, held_out: Any, history: History, record: Any) -> dict:
        """Anything else a chapter keeps per (run, seed) (JSON data); nothing by default."""
        return {}

    def continue_at(self) -> int:
        """The step a continuing run starts from: the last ``finetune_steps`` of the setup's."""
        s = self.setup
        finetune = getattr(s, "finetune_steps", None)
        if finetune is None or not 0 < finetune < s.steps:
            raise ValueError(
                f"a continuing run needs 0 < finetune_steps < steps, got finetune_steps="
                f"{finetune!r} of steps={s.steps}"
            )
        return s.steps - finetune

    def last_step(self, name: str) -> int:
        """The step run ``name``'s curve ends at (``curve_from_branch``: a continuing run's
        counts its own steps)."""
        if self.runs[name].continues is not None and self.curve_from_branch:
            return self.setup.steps - self.continue_at()
        return self.setup.steps

    # ---- what the harness does -----------------------------------------------------------

    def train_config(
        self, run: Run, seed: int, progress: bool, steps: int | None = None, start: int = 0
    ) -> TrainConfig:
        """The run's TrainConfig: ``steps`` steps (default: to the end) of the declared schedule
        from step ``start`` on."""
        s = self.setup
        schedule = getattr(s, "lr_schedule", "constant")
        base = TrainConfig(
            steps=s.steps - start if steps is None else steps,
            schedule_steps=s.steps,
            start_step=start,
            lr=s.lr,
            seed=seed,
            eval_every=self.eval_every,
            lr_schedule=schedule,
        )
        return replace(base, progress=progress, **run.train)

    def declared(self) -> dict[str, dict]:
        """Every run's config as data, as ``results.json`` stores it."""
        declared = {}
        for name, run in self.runs.items():
            moe = run.moe_config(self.base_moe()).to_dict()
            declared[name] = {"moe": moe, "train": dict(run.train)}
            if run.continues is not None:
                declared[name] |= {"continues": run.continues, "from_step": self.continue_at()}
        return declared

    def keep_snapshot(self, name: str, seed: int, model: nn.Module) -> None:
        """Give the harness run ``name``'s model of ``seed`` at the step the runs continuing it
        start from (a shipped checkpoint, say), so they need not train it again. The caller
        vouches that it is that model: a continued run's curve is then the cached one's only if
        the checkpoint is what the run's own training gives."""
        if name not in self.runs:
            raise ValueError(f"unknown run {name!r}; declared: {list(self.runs)}")
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._snapshots[(name, seed, self.continue_at())] = state

    def initial_model(self, name: str, seed: int) -> nn.Module:
        """Run ``name``'s model of ``seed`` before its training: the seed's draw, or for a
        continuing run its source's model at the branch, in this run's config."""
        if name not in self.runs:
            raise ValueError(f"unknown run {name!r}; declared: {list(self.runs)}")
        return self._start(self.runs[name], seed)[0]

    def _start(self, run: Run, seed: int) -> tuple[nn.Module, int]:
        """A run's model before training, and the step it starts at: the seed's draw at 0, or
        for a continuing run the source's snapshot (its weights in this run's config)."""
        model = self.build(run, seed).to(self.setup.device)
        if run.continues is None:
            return model, 0
        at = self.continue_at()
        key = (run.continues, seed, at)
        if key not in self._snapshots:  # the source's first steps again, on its schedule
            self._train(run.continues, seed, False, at)
        model.load_state_dict(self._snapshots[key])
        return model, at

    def _train(self, name: str, seed: int, progress: bool, steps: int | None = None):
        """Train run ``name`` on ``seed`` (``steps``: only its first steps); (model, history,
        record, seconds, start step). Keeps the snapshots later runs continue from."""
        if name not in self.runs:
            raise ValueError(f"unknown run {name!r}; declared: {list(self.runs)}")
        run = self.runs[name]
        get_batch, held_out = self.data(seed)
        model, start = self._start(run, seed)
        self.current = (name, seed)  # for ``batches``, ``recorder`` and ``extra``
        get_batch = self.batches(get_batch, model)
        if start:  # the batches the source sees from its step ``start`` on
            get_batch = skipping(get_batch, start)
        config = self.train_config(run, seed, progress, steps, start)
        wanted = {self.continue_at() for r in self.runs.values() if r.continues == name}
        record = self.recorder(name)

        def callback(step: int, model: nn.Module, out: Any) -> None:
            if record is not None:
                record(step, model, out)
            if start + step in wanted:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                self._snapshots[(name, seed, start + step)] = state

        began = time.perf_counter()
        history = train(
            model,
            get_batch,
            config,
            evaluate=lambda m: self.evaluate(m, held_out),
            callback=callback,
        )
        return model, history, record, time.perf_counter() - began, start, held_out

    def run_one(
        self, name: str, seed: int, progress: bool = False, steps: int | None = None
    ) -> dict:
        """Train run ``name`` on ``seed``; its measures, curve and extras. ``steps``: only the
        first steps of the run, on its declared schedule: its curve is the cached one's prefix."""
        return self.trained(name, seed, progress, steps)[1]

    def trained(
        self, name: str, seed: int, progress: bool = False, steps: int | None = None
    ) -> tuple[nn.Module, dict]:
        """``run_one``'s record, and the trained model."""
        model, history, record, seconds, start, held_out = self._train(name, seed, progress, steps)
        evals = history.evals
        origin = 0 if self.curve_from_branch else start
        curve = {"step": [origin + s for s, _ in evals]} | {
            k: [e[k] for _, e in evals] for k in evals[-1][1]
        }
        return model, {
            "run": name,
            "seed": seed,
            "measures": dict(history.final_eval),
            "curve": curve,
            "train_loss": history.loss[:: max(1, len(history.loss) // 100)],
            "seconds": seconds,
            "extra": self.extra(model, held_out, history, record),
        }

    def header(self, command: str) -> dict:
        return {
            "format": FORMAT,
            "experiment": self.name,
            "command": command,
            "versions": {
                "minimoe": minimoe.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "setup": asdict(self.setup) | {"seed": None, "device": None},
            "runs": self.declared(),
        }

    def run_all(
        self,
        out: Path,
        names: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        progress: bool = True,
        command: str | None = None,
    ) -> Results:
        """Train ``names`` x ``seeds`` (default: all), merged into ``out/results.json`` (a run
        already there for the same seed is replaced), written after every run."""
        names, seeds = list(names or self.runs), list(seeds or self.seeds)
        for name in names:
            if name not in self.runs:
                raise ValueError(f"unknown run {name!r}; declared: {list(self.runs)}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        path = out / "results.json"
        head = self.header(command or _command_line())
        done = load(self, path).data["results"] if path.exists() else []
        for seed in seeds:
            for name in names:
                r = self.run_one(name, seed, progress)
                done = [d for d in done if (d["run"], d["seed"]) != (name, seed)] + [r]
                shown = "  ".join(f"{k} {v:.4f}" for k, v in list(r["measures"].items())[:4])
                print(f"{name:>16} seed {seed}: {shown}  ({r['seconds']:.0f} s)", flush=True)
                all_seeds = sorted({d["seed"] for d in done})
                write(out, head | {"seeds": all_seeds, "results": done})
        return Results(head | {"seeds": sorted({d["seed"] for d in done}), "results": done})

    # ---- the command line ----------------------------------------------------------------

    def add_parser(self, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """``python -m course <name>``: a flag per setup field, ``--seeds``, ``--runs``."""
        p = sub.add_parser(self.name, help=self.help)
        add_setup_args(p, self.setup)
        p.add_argument(
            "--seeds",
            type=non_negative_int,
            nargs="+",
            default=list(self.seeds),
            action=DistinctSeeds,
        )
        p.add_argument("--runs", nargs="+", default=None, help=f"from {list(self.runs)}")
        add_experiment_args(p, out=f"runs/{self.name}")
        p.set_defaults(func=type(self).main)
        return p

    @classmethod
    def main(cls, args: argparse.Namespace) -> Results:
        set_threads(args)
        return cls.from_args(args).run_args(args)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Experiment:
        """The experiment with the setup the command's flags give."""
        names = {f.name for f in fields(cls.setup_class)} - {"seed"}
        return cls(cls.setup_class(**{n: getattr(args, n) for n in names}))

    def run_args(self, args: argparse.Namespace) -> Results:
        """``run_all`` with the command's runs, seeds and output folder."""
        command = getattr(args, "command_line", None)  # as typed (minimoe.cli.run_commands)
        return self.run_all(args.out, args.runs, args.seeds, not args.no_progress, command)


def skipping(get_batch: Callable, skip: int) -> Callable:
    """``get_batch`` that first draws (and drops) ``skip`` batches from the trainer's generator:
    a continued run sees the batches its source sees from step ``skip`` on."""
    skipped = False

    def get(generator: torch.Generator):
        nonlocal skipped
        if not skipped:
            for _ in range(skip):
                get_batch(generator)
            skipped = True
        return get_batch(generator)

    return get


def _command_line() -> str:
    return " ".join(["python -m course"] + [shlex.quote(a) for a in sys.argv[1:]])


# ---- one results format ------------------------------------------------------------------


def write(out: Path, data: dict) -> Path:
    """``results.json`` and ``results.csv`` in ``out``; each replaced only once fully written."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    with tempfile.NamedTemporaryFile("w", dir=out, suffix=".tmp", delete=False) as f:
        try:
            json.dump(data, f, indent=1)
            f.write("\n")
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)  # a temporary file is private; results are not
    os.replace(f.name, path)
    rows = [{"run": r["run"], "seed": r["seed"], **r["measures"]} for r in data["results"]]
    if rows:
        tmp = write_csv(out / "results.csv.tmp", rows)
        os.replace(tmp, out / "results.csv")
    return path


def merge(experiment: Experiment, parts: Sequence[str | Path], out: Path) -> Results:
    """Join results files of one experiment written by processes run side by side (each
    checked by ``load``) into ``out/results.json``; a (run, seed) in two parts is refused."""
    loaded = [load(experiment, p) for p in parts]
    records: dict[tuple[str, int], dict] = {}
    for part, results in zip(parts, loaded):
        for r in results.data["results"]:
            key = (r["run"], r["seed"])
            if key in records:
                raise ValueError(f"run {key[0]!r} seed {key[1]} is in two parts (again in {part})")
            records[key] = r
    head = {k: v for k, v in loaded[0].data.items() if k not in ("seeds", "results")}
    data = head | {"seeds": sorted({s for _, s in records}), "results": list(records.values())}
    write(out, data)
    return Results(data)


def _with_defaults(stored: dict) -> dict:
    """A stored run's config with the defaults of fields added to ``MoEConfig`` or its router
    spec since it was written (so a new field whose default keeps the old rule keeps the cache
    valid); as stored if it no longer reads (an unknown field: the comparison then refuses)."""
    try:
        moe = MoEConfig.from_dict(stored["moe"]).to_dict()
    except (KeyError, TypeError, ValueError):
        return stored
    return json.loads(json.dumps(stored | {"moe": moe}))


def load(experiment: Experiment, path: str | Path | None = None) -> Results:
    """The results of ``experiment`` (by default its cached ``data/<name>/results.json``),
    checked against its declared runs: a run whose stored config differs is refused."""
    path = Path(path) if path is not None else DATA / experiment.name / "results.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no {path}: data/ ships with the repository; data/README.md gives the command "
            f"that regenerates it (python -m course {experiment.name})"
        )
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT or data.get("experiment") != experiment.name:
        raise ValueError(
            f"{path} is not {experiment.name}'s results in format {FORMAT} "
            f"(format {data.get('format')!r}, experiment {data.get('experiment')!r}): regenerate it"
        )
    declared = experiment.declared()
    for name, stored in data["runs"].items():
        if name in declared and _with_defaults(stored) != json.loads(json.dumps(declared[name])):
            raise ValueError(
                f"{path}: run {name!r} was made with {stored}, but is declared as "
                f"{declared[name]}: regenerate it"
            )
    return Results(data)


@dataclass
class Results:
    """One experiment's results.json, and the paired statistics over its seeds."""

    data: dict

    @property
    def seeds(self) -> list[int]:
        return list(self.data["seeds"])

    @property
    def runs(self) -> list[str]:
        return list(dict.fromkeys(r["run"] for r in self.data["results"]))

    def record(self, run: str, seed: int) -> dict:
        for r in self.data["results"]:
            if (r["run"], r["seed"]) == (run, seed):
                return r
        raise KeyError(f"no result for run {run!r}, seed {seed}; runs: {self.runs}")

    def seeds_of(self, *runs: str) -> list[int]:
        """The seeds every one of ``runs`` has, in order."""
        have = [{r["seed"] for r in self.data["results"] if r["run"] == n} for n in runs]
        for n, h in zip(runs, have):
            if not h:
                raise KeyError(f"no results for run {n!r}; runs: {self.runs}")
        return sorted(set.intersection(*have))

    def values(self, run: str, measure: str, seeds: Iterable[int] | None = None) -> list[float]:
        """``measure`` of ``run``, one value per seed (all its seeds by default): a held-out
        measure, or else a number the chapter keeps in ``extra``."""
        seeds = self.seeds_of(run) if seeds is None else seeds
        values = []
        for s in seeds:
            r = self.record(run, s)
            if measure not in r["measures"] and measure not in r.get("extra", {}):
                raise KeyError(f"run {run!r} has no measure {measure!r}: {list(r['measures'])}")
            values.append(r["measures"].get(measure, r.get("extra", {}).get(measure)))
        return values

    def curve(self, run: str, seed: int, measure: str) -> dict[int, float] | None:
        """``measure`` of ``run`` on ``seed`` at each evaluated step; None if not recorded."""
        c = self.record(run, seed)["curve"]
        return dict(zip(c["step"], c[measure])) if measure in c and len(c["step"]) > 1 else None

    def rerun_tolerance(self, run: str, measure: str, step: int) -> float:
        """How far a live re-run of ``run`` may sit from its cached curve at an evaluated
        ``step``: the range of ``measure`` over the cached seeds there, at least ``EXACT``.

        Where the cache was made the two agree to the last digits. On another CPU, torch build
        or a GPU the rounding differs, and routing's discrete choices (a threshold, a near-tie in
        a top-k) amplify it over the steps until a re-run differs as much as another seed may.
        """
        values = [self.curve(run, s, measure)[step] for s in self.seeds_of(run)]
        return max(EXACT, max(values) - min(values))

    def drift(self, a: str, b: str | None, measure: str) -> float | None:
        """Mean over seeds of how much ``a``'s curve (minus ``b``'s) moved over the last fifth
        of training (on the steps both evaluated); None without curves."""
        drifts = []
        for s in self.seeds_of(a) if b is None else self.seeds_of(a, b):
            ca = self.curve(a, s, measure)
            cb = {} if b is None else self.curve(b, s, measure)
            if ca is None or cb is None:
                return None
            steps = sorted(ca) if b is None else sorted(set(ca) & set(cb))
            gap = [ca[t] - (cb[t] if b is not None else 0.0) for t in steps]
            drifts.append(stats.tail_drift(steps, gap))
        return sum(drifts) / len(drifts)

    def differences(self, a: str, b: str, measure: str) -> list[float]:
        """``a`` minus ``b`` on ``measure``, one per seed both have."""
        seeds = self.seeds_of(a, b)
        return [
            x - y for x, y in zip(self.values(a, measure, seeds), self.values(b, measure, seeds))
        ]

    def compare(
        self, a: str, b: str, measure: str, lower_is_better: bool = True
    ) -> stats.Comparison:
        """``a`` minus ``b`` on ``measure``, paired by seed (uncorrected), with the drifts."""
        seeds = self.seeds_of(a, b)
        own = [self.drift(n, None, measure) for n in (a, b)]
        return stats.compare(
            self.values(a, measure, seeds), self.values(b, measure, seeds), (a, b), measure,
            drift=self.drift(a, b, measure),
            run_drift=None if None in own else max(own, key=abs),
            lower_is_better=lower_is_better,
        )  # fmt: skip

    def family(
        self, pairs: Sequence[tuple[str, str, str]], lower_is_better: bool = True
    ) -> list[stats.Comparison]:
        """A chapter's family of comparisons ``(a, b, measure)``, Holm-corrected together."""
        return stats.holm([self.compare(a, b, m, lower_is_better) for a, b, m in pairs])

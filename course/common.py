"""What the chapters' experiments share: the set-up, cached results, tables over seeds, timing.

The library's own command line (``minimoe.cli``) holds the checked argparse types and the
router flags; batch samplers live in ``minimoe.data``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from minimoe.cli import (
    non_negative,
    non_negative_int,
    positive,
    positive_int,
)
from minimoe.layer import MoEConfig
from minimoe.model import ModelConfig

DATA = Path(__file__).resolve().parent.parent / "data"  # the repository's data/: cached results


def cached(name: str) -> Path:
    """``data/<name>``, a cached result of a bigger run that a chapter reads (see data/README.md)."""
    path = DATA / name
    if not path.exists():
        raise FileNotFoundError(
            f"no {path}: clone the repository: data/ ships with it; "
            f"data/README.md gives the command that regenerates {name}"
        )
    return path


# ---- the set-up ----------------------------------------------------------------------------


@dataclass
class Setup:
    """What every run of one comparison shares: the tiny transformer's size and the training run.
    Each chapter's Setup adds its own fields and defaults."""

    n_layers: int = 2
    d_model: int = 64
    d_hidden: int = 128  # width of each expert
    num_experts: int = 8
    batch_size: int = 32
    steps: int = 600
    lr: float = 3e-3
    seed: int = 0
    device: str = "cpu"

    def model_config(self, vocab_size: int, block_size: int, **moe: Any) -> ModelConfig:
        """A TinyTransformer with 4 heads; ``moe``: MoEConfig fields (``router=TopP(p=0.4)``, ...)."""
        size = dict(d_model=self.d_model, d_hidden=self.d_hidden, num_experts=self.num_experts)
        layers = dict(n_layers=self.n_layers, n_heads=4)
        return ModelConfig(vocab_size, block_size, **layers, moe=MoEConfig(**(size | moe)))


# Setup fields for which 0 means something (a seed); every other size, count, period and rate
# must be > 0 (0 windows score nothing, a block of 0 divides by zero, a period of 0 never comes)
MAY_BE_ZERO = ("task_seed",)


def add_setup_args(p: argparse.ArgumentParser, defaults: Setup) -> None:
    """A flag per field of ``defaults`` but seed and device (the commands take ``--seeds`` and
    ``--device``), its value the default; numbers out of range are refused by argparse."""
    for f in fields(defaults):
        if f.name not in ("seed", "device"):
            value = getattr(defaults, f.name)
            real = isinstance(value, float) or f.name == "capacity_factor"
            if isinstance(value, str):
                check = str
            elif f.name in MAY_BE_ZERO:
                check = non_negative if real else non_negative_int
            else:
                check = positive if real else positive_int
            p.add_argument(
                "--" + f.name.replace("_", "-"),
                type=check,
                default=value,
                help="default: %(default)s",
            )


class DistinctSeeds(argparse.Action):
    """``--seeds 0 1 2``: each seed once (a repeated seed would count one run as two)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            parser.error(f"{option_string}: each seed once, got {repeated} more than once")
        setattr(namespace, self.dest, values)


def setup_from_args(cls: type[Setup], args: argparse.Namespace, seed: int) -> Setup:
    """The Setup of ``add_setup_args``'s (and ``--device``'s) options, for one seed."""
    return cls(
        **{f.name: getattr(args, f.name) for f in fields(cls) if f.name != "seed"}, seed=seed
    )


def add_experiment_args(p: argparse.ArgumentParser, out: str) -> None:
    """--device, --threads, --out and --no-progress, shared by every experiment command."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (tiny models: 1 is fastest)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(out),
        help="folder for the table and plots (runs/ is git-ignored)",
    )
    p.add_argument("--no-progress", action="store_true")


def set_threads(args: argparse.Namespace) -> None:
    """Apply --threads, if given."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)


# ---- tables over seeds ---------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict], fieldnames: Sequence[str] | None = None) -> Path:
    """``rows`` as CSV; columns ``fieldnames`` (default: every key, in order of appearance)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(
            f,
            fieldnames=list(fieldnames or dict.fromkeys(k for r in rows for k in r)),
            extrasaction="ignore",
        )
        w.writeheader()
        w.writerows(rows)
    return path


# ---- timing ---------------------------------------------------------------------------------


@dataclass
class Timings:
    """Seconds of every timed call, per name, one call of each name per round.

    ``timings[name]`` is the median; ``ratio(name, reference)`` the median over rounds of
    time(name) / time(reference) measured in the same round (paired: a slow round slows both,
    so the ratio is steadier than the ratio of two medians).
    """

    rounds: dict[str, list[float]]

    def __getitem__(self, name: str) -> float:
        return statistics.median(self.rounds[name])

    def ratios(self, name: str, reference: str) -> list[float]:
        """time(name) / time(reference), round by round."""
        for n in (name, reference):
            if n not in self.rounds:
                raise ValueError(f"no timings for {n!r}; timed: {list(self.rounds)}")
        pairs = zip(self.rounds[name], self.rounds[reference], strict=True)
        return [t / t_ref for t, t_ref in pairs]

    def ratio(self, name: str, reference: str) -> float:
        return statistics.median(self.ratios(name, reference))

    def band(self, name: str, reference: str) -> str:
        """The ratio with its noise band, for printing (never for an assert): the median and
        the quartiles of the per-round ratios, e.g. ``"0.91x (0.88-0.95)"``."""
        ratios = self.ratios(name, reference)
        q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        return f"{q2:.2f}x ({q1:.2f}-{q3:.2f})"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); nothing to do on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    before: Callable[[], None] | None = None,
) -> Timings:
    """Time each fn ``repeats`` times on ``device``; every round calls each once, the order
    alternating between rounds (ABC, CBA, ...) so that drift and background load hit all alike.
    ``before()`` runs before every call, outside the timer (to reset gradients, say)."""
    rounds: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            if before is not None:
                before()
            synchronize(device)
            start = time.perf_counter()
            fns[n]()
            synchronize(device)
            if r >= warmup:
                rounds[n].append(time.perf_counter() - start)
    return Timings(rounds)

"""Pieces every experiment needs: batch samplers, model construction, argument parsing, timing."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minimoe.data import ByteCorpus, MultiTaskData, ToyTask
from minimoe.layer import MoEConfig
from minimoe.routing import ROUTERS

Batch = dict[str, torch.Tensor]


def lm_batches(corpus: ByteCorpus, batch_size: int, block_size: int, split: str = "train") -> Callable[[torch.Generator], Batch]:
    """Random windows of the byte corpus as {idx, targets}."""
    def get(g: torch.Generator) -> Batch:
        idx, targets = corpus.batch(split, batch_size, block_size, g)
        return {"idx": idx, "targets": targets}
    return get


def multitask_batches(data: MultiTaskData, batch_size: int) -> Callable[[torch.Generator], Batch]:
    """Random samples of the graded token tasks as {idx, targets} (loss on answers only)."""
    def get(g: torch.Generator) -> Batch:
        i = torch.randint(0, len(data), (batch_size,), generator=g)
        return {"idx": data.inputs[i], "targets": data.targets[i]}
    return get


def toy_batches(task: ToyTask, batch_size: int) -> Callable[[torch.Generator], Batch]:
    """Random samples of the toy regression task as {x, y}."""
    def get(g: torch.Generator) -> Batch:
        i = torch.randint(0, len(task), (batch_size,), generator=g)
        return {"x": task.x[i], "y": task.y[i]}
    return get


def add_moe_args(p: argparse.ArgumentParser) -> None:
    """Router and layer options, named as MoEConfig's fields."""
    g = p.add_argument_group("MoE layer")
    g.add_argument("--router", default="top_k", choices=sorted(ROUTERS))
    g.add_argument("--k", type=int, default=2)
    g.add_argument("--top-p", type=float, default=0.4)
    g.add_argument("--adaptive-threshold", type=float, default=0.1)
    g.add_argument("--experts", type=int, default=8, help="number of experts")
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--d-hidden", type=int, default=128, help="width of each expert")
    g.add_argument("--capacity-factor", type=float, default=None, help="omit for dropless")
    g.add_argument("--balance-coef", type=float, default=1e-2)
    g.add_argument("--z-coef", type=float, default=1e-3)
    g.add_argument("--dynamic-coef", type=float, default=None, help="default: 1e-4 for top_p, else 0")
    g.add_argument("--dispatch", default="sorted", choices=["sorted", "loop"])


def moe_config_from_args(args: argparse.Namespace, **overrides) -> MoEConfig:
    fields = dict(
        d_model=args.d_model, d_hidden=args.d_hidden, num_experts=args.experts, router=args.router,
        k=args.k, top_p=args.top_p, adaptive_threshold=args.adaptive_threshold,
        capacity_factor=args.capacity_factor, balance_coef=args.balance_coef, z_coef=args.z_coef,
        dynamic_coef=args.dynamic_coef, dispatch=args.dispatch,
    )
    return MoEConfig(**(fields | overrides))


def add_run_args(p: argparse.ArgumentParser, steps: int = 300) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=steps)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--autocast", choices=("bfloat16", "float16"), default=None,
                   help="mixed precision (float16: CUDA only); routers stay float32")
    g.add_argument("--out", type=Path, default=None, help="folder for results (JSON, plots, checkpoint)")
    g.add_argument("--no-progress", action="store_true")


def add_experiment_args(p: argparse.ArgumentParser, out: str) -> None:
    """--device, --threads, --out and --no-progress, shared by every experiment command."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (tiny models: 1 is fastest)")
    p.add_argument("--out", type=Path, default=Path(out), help="folder for the table and plots (runs/ is git-ignored)")
    p.add_argument("--no-progress", action="store_true")


def set_threads(args: argparse.Namespace) -> None:
    """Apply --threads, if given."""
    if args.threads:
        torch.set_num_threads(args.threads)


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


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

    def ratio(self, name: str, reference: str) -> float:
        for n in (name, reference):
            if n not in self.rounds:
                raise ValueError(f"no timings for {n!r}; timed: {list(self.rounds)}")
        pairs = zip(self.rounds[name], self.rounds[reference], strict=True)
        return statistics.median(t / t_ref for t, t_ref in pairs)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); nothing to do on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2,
                device: torch.device | str = "cpu",
                before: Callable[[], None] | None = None) -> Timings:
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

"""Chapter 5: adaptive gating vs top-2, the threshold sweep and the curriculum
(``python -m course adaptive``).

Every run trains a TinyTransformer on ``make_multitask`` (copy < reverse < sort < add: the
task index is the difficulty) in epochs of a ``CurriculumSampler``: shuffled, or in the
curriculum's order. Validation loss (answer tokens) is taken every ``eval_every`` steps.
Routing statistics leave padding out. Wall-clock comparisons are interleaved: each round
runs every variant once, in alternating order; a time ratio is the median over rounds of the
two variants' ratio in the same round (``course.common.interleaved``).
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from course import common, harness
from course.common import (
    DistinctSeeds,
    Timings,
    add_experiment_args,
    add_setup_args,
    interleaved,
    load_json,
    seed_means,
    set_threads,
    setup_from_args,
    write_seed_results,
)
from minimoe.analysis import RoutingRecorder, experts_per_token_by_group
from minimoe.cli import non_negative, non_negative_int, positive_int
from minimoe.curriculum import CurriculumSampler
from minimoe.data import EOS_ID, PAD_ID, VOCAB, Batch, MultiTaskData, make_multitask, seq_len
from minimoe.dispatch import combine
from minimoe.experts import Experts
from minimoe.layer import moe_layers
from minimoe.model import TinyTransformer, set_router
from minimoe.routing import Adaptive, Router, TopK, top_k
from minimoe.train import History, TrainConfig, mean_loss, train

ADAPTIVE = Adaptive(threshold=0.1)  # the chapter's router: the paper's threshold, raw gap
TOKEN_KINDS = ("prompt", "answer", "end")  # end: <eos> and <pad> inputs, nothing left to say


@dataclass
class Setup(common.Setup):
    """The scale of one comparison (the notebook's defaults run in seconds on one CPU core)."""

    steps: int = 200
    lr: float = 5e-3
    n_train: int = 2048
    n_val: int = 512
    max_len: int = 4  # longest operand: sequences of seq_len(4) = 16 tokens
    eval_every: int = 10


def make_data(setup: Setup) -> tuple[MultiTaskData, MultiTaskData]:
    """Training and validation samples (disjoint seeds)."""
    return (
        make_multitask(setup.n_train, max_len=setup.max_len, seed=setup.seed),
        make_multitask(setup.n_val, max_len=setup.max_len, seed=setup.seed + 1000),
    )


def build_model(
    setup: Setup, router: Router = ADAPTIVE, z_coef: float | None = None
) -> TinyTransformer:
    """The chapter's model from the setup's seed, with its router paper's losses
    (``router.paper_losses``: for top-k and adaptive gating a balance loss on top-1 decisions,
    alpha = 1e-2, and no z-loss); ``z_coef`` adds a router z-loss (the course's default: 1e-3)."""
    torch.manual_seed(setup.seed)
    losses = dict(router.paper_losses) | ({} if z_coef is None else {"z_coef": z_coef})
    config = setup.model_config(len(VOCAB), seq_len(setup.max_len), router=router, **losses)
    return TinyTransformer(config).to(setup.device)


def token_kind(data: MultiTaskData) -> Tensor:
    """(N, L) index into TOKEN_KINDS: answer = scored positions ('=' and answer digits, which
    predict the answer), end = <eos>/<pad> inputs, prompt = the rest (task, operands, '+')."""
    kind = torch.zeros_like(data.inputs)
    kind[data.answer_mask] = TOKEN_KINDS.index("answer")
    kind[(data.inputs == PAD_ID) | (data.inputs == EOS_ID)] = TOKEN_KINDS.index("end")
    return kind


@dataclass
class Run:
    name: str
    model: TinyTransformer
    history: History
    sampler: CurriculumSampler
    seconds: float  # wall time of train(), ranking included

    @property
    def eval_steps(self) -> list[int]:
        return [s for s, _ in self.history.evals]

    @property
    def eval_loss(self) -> list[float]:
        return [m["loss"] for _, m in self.history.evals]

    @property
    def final_loss(self) -> float:
        """Mean validation loss over the last three evaluations (less noisy than the last one)."""
        return statistics.fmean(self.eval_loss[-3:])

    def loss_at(self, step: int) -> float:
        """Validation loss at the evaluation nearest to ``step``."""
        i = min(range(len(self.eval_steps)), key=lambda j: abs(self.eval_steps[j] - step))
        return self.eval_loss[i]

    def steps_to(self, target: float) -> int | None:
        """First evaluated step at which validation loss is <= target (None: never)."""
        return next((s for s, v in zip(self.eval_steps, self.eval_loss) if v <= target), None)


def train_variant(
    setup: Setup,
    data: MultiTaskData,
    val: MultiTaskData,
    name: str,
    router: Router = ADAPTIVE,
    curriculum: bool = False,
    progress: bool = False,
    z_coef: float | None = None,
) -> Run:
    """Train one variant from the setup's seed; every variant sees the same initial weights
    (``build_model``: the paper's losses, ``z_coef`` a router z-loss added)."""
    model = build_model(setup, router, z_coef)
    samples = {"idx": data.inputs, "targets": data.targets}
    sampler = CurriculumSampler(
        model, samples, setup.batch_size, curriculum=curriculum, valid=data.inputs != PAD_ID
    )
    val_batch = [{"idx": val.inputs, "targets": val.targets}]
    config = TrainConfig(
        steps=setup.steps,
        lr=setup.lr,
        seed=setup.seed,
        eval_every=setup.eval_every,
        progress=progress,
    )
    start = time.perf_counter()
    history = train(model, sampler, config, evaluate=lambda m: mean_loss(m, val_batch))
    return Run(name, model, history, sampler, time.perf_counter() - start)


@torch.no_grad()
def routing_report(model: nn.Module, val: MultiTaskData) -> dict:
    """Share of (non-padding) tokens on two experts, per layer, per task and per token kind,
    and the expert FLOPs of one validation pass."""
    real = (val.inputs != PAD_ID).reshape(-1)  # (T,)
    task = val.task[:, None].expand_as(val.inputs).reshape(-1)  # (T,)
    kind = token_kind(val).reshape(-1)  # (T,)
    model.eval()
    with RoutingRecorder(model) as rec:
        out = model(idx=val.inputs.to(next(model.parameters()).device))
    layers = [rec.routing(i) for i in range(len(rec))]

    def share(groups: Tensor) -> dict[int, float]:
        per_layer = [experts_per_token_by_group(r, groups) for r in layers]  # {group: ept}
        return {g: statistics.fmean(d[g] - 1 for d in per_layer) for g in per_layer[0] if g >= 0}

    two = torch.stack([r.mask.sum(1) > 1 for r in layers])[:, real]  # (layers, T_real)
    return {
        "two_expert_share": two.float().mean().item(),
        "per_layer": two.float().mean(1).tolist(),
        "by_task": share(task.masked_fill(~real, -1)),
        "by_kind": share(kind),
        "flops": sum(m.stats.flops.item() for m in out.layers),
    }


def with_threshold(model: TinyTransformer, threshold: float) -> TinyTransformer:
    """A copy of an adaptive model that routes with another threshold (0: top-1, 1: top-2)."""
    router = moe_layers(model)[0].config.router
    return set_router(copy.deepcopy(model), replace(router, threshold=threshold))


def time_train_steps(models: dict[str, nn.Module], batch: Batch, repeats: int = 20) -> Timings:
    """Seconds of one training step (forward, backward, AdamW update) per model, on one batch,
    interleaved: ``[name]`` the median, ``.ratio(name, reference)`` the paired ratio. The
    update runs at lr 0: all the arithmetic, none of the change."""
    device = next(next(iter(models.values())).parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}

    def step(model: nn.Module) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)

        def run() -> None:
            out = model(**batch)
            (out.loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    for m in models.values():
        m.train()
    result = interleaved({n: step(m) for n, m in models.items()}, repeats, device=device)
    for m in models.values():
        m.eval()
    return result


def time_dispatch(
    two_shares: Sequence[float] = (0.0, 0.2, 0.5, 0.8, 1.0),
    tokens: int = 2048,
    d_model: int = 64,
    d_hidden: int = 128,
    num_experts: int = 8,
    repeats: int = 15,
    seed: int = 0,
    device: str = "cpu",
) -> list[dict[str, float]]:
    """The experts alone, forward + backward through the sorted dispatch path, for routings
    where ``share`` of the tokens keep their top-2 expert and the rest only their top-1.
    Returns per share: pairs and time relative to top-2 (share 1): the median over
    interleaved rounds of the two times' ratio in the same round."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    experts = Experts(num_experts=num_experts, d_model=d_model, d_hidden=d_hidden).to(device)
    x = torch.randn(tokens, d_model, generator=gen).to(device).requires_grad_(True)
    full = top_k(torch.randn(tokens, num_experts, generator=gen), 2)
    second = full.mask & (full.probs < full.probs.amax(1, keepdim=True))  # (T, E) the top-2 pair
    rank = torch.randperm(tokens, generator=gen)  # tokens that keep two: the first share * T
    shares = sorted(set(two_shares) | {1.0})  # top-2 (share 1) is the reference
    masks = {s: full.mask & ~(second & (rank >= round(s * tokens))[:, None]) for s in shares}

    def step(mask: Tensor) -> Callable[[], None]:
        mask, weights = mask.to(device), (full.probs * mask).to(device)

        def run() -> None:
            combine(x, weights, mask, experts).sum().backward()
            x.grad = None
            for p in experts.parameters():
                p.grad = None

        return run

    times = interleaved({s: step(m) for s, m in masks.items()}, repeats, device=device)
    return [
        {
            "two_expert_share": s,
            "flop_ratio": int(masks[s].sum()) / (2 * tokens),
            "time_ratio": times.ratio(s, 1.0),
            "time_band": times.band(s, 1.0),  # the ratio with its quartiles, for printing
            "seconds": times[s],
        }
        for s in shares
    ]


# ---- the comparison, at any scale (the command) -----------------------------------------------


def compare(
    setup: Setup,
    thresholds: Sequence[float] = (0.05, 0.1, 0.2, 0.3),
    timing_repeats: int = 20,
    progress: bool = False,
) -> dict:
    """Top-2, top-2 without renormalization (adaptive gating's control: its weights stay raw
    too), adaptive at each threshold, adaptive (T = 0.1) with the curriculum, and adaptive
    (T = 0.1) with the course's router z-loss (1e-3); all with the paper's losses otherwise."""
    data, val = make_data(setup)
    runs = {"top-2": train_variant(setup, data, val, "top-2", router=TopK(k=2), progress=progress)}
    runs["top-2 raw"] = train_variant(
        setup, data, val, "top-2 raw", TopK(k=2, renormalize=False), progress=progress
    )
    for t in thresholds:
        runs[f"adaptive T={t}"] = train_variant(
            setup, data, val, f"adaptive T={t}", Adaptive(threshold=t), progress=progress
        )
    runs["adaptive T=0.1 + curriculum"] = train_variant(
        setup,
        data,
        val,
        "adaptive T=0.1 + curriculum",
        Adaptive(threshold=0.1),
        curriculum=True,
        progress=progress,
    )
    runs["adaptive T=0.1 z=0.001"] = train_variant(
        setup,
        data,
        val,
        "adaptive T=0.1 z=0.001",
        Adaptive(threshold=0.1),
        progress=progress,
        z_coef=1e-3,
    )
    batch = {"idx": data.inputs[: setup.batch_size], "targets": data.targets[: setup.batch_size]}
    models = {n: r.model for n, r in runs.items()}
    if "adaptive T=0.1" in runs:  # the same weights routed top-1: what the experts cost at most
        models["top-1 routing"] = with_threshold(runs["adaptive T=0.1"].model, 0.0)
    step_time = time_train_steps(models, batch, timing_repeats)
    top2 = runs["top-2"]
    reports = {n: routing_report(r.model, val) for n, r in runs.items()}
    targets = {"final": top2.final_loss, "half": top2.loss_at(setup.steps // 2)}
    rows = []
    for n, r in runs.items():
        rows.append(
            {
                "variant": n,
                "final_val_loss": round(r.final_loss, 4),
                "loss_vs_top2": round(r.final_loss - top2.final_loss, 4),
                "loss_vs_top2_raw": round(r.final_loss - runs["top-2 raw"].final_loss, 4),
                "two_expert_share": round(reports[n]["two_expert_share"], 4),
                "flop_ratio": round(reports[n]["flops"] / reports["top-2"]["flops"], 4),
                "step_time_ratio": round(step_time.ratio(n, "top-2"), 4),
                "steps_to_top2_final_loss": r.steps_to(targets["final"]),
                "steps_to_top2_half_loss": r.steps_to(targets["half"]),
                "ranking_share_of_time": round(r.sampler.ranking_seconds / r.seconds, 4),
            }
        )
    return {
        "setup": asdict(setup),
        "rows": rows,
        "targets": targets,
        "step_seconds": {n: step_time[n] for n in models},
        "curves": {n: {"steps": r.eval_steps, "val_loss": r.eval_loss} for n, r in runs.items()},
        "routing": {
            n: {k: v for k, v in rep.items() if k != "flops"} for n, rep in reports.items()
        },
        "dispatch": time_dispatch(
            d_model=setup.d_model,
            d_hidden=setup.d_hidden,
            num_experts=setup.num_experts,
            device=setup.device,
            repeats=timing_repeats,
        ),
    }


def load_cached(path: str | Path | None = None) -> dict:
    """Results of the command; by default the shipped bigger run (data/adaptive/; see data/README.md)."""
    return load_json(path, "adaptive/results.json")


def as_results(cached: dict) -> harness.Results:
    """The cached runs as the harness's results, for its paired statistics, with the validation
    loss curves (this cache predates the harness's format)."""
    return harness.Results.from_rows(cached["per_seed"], "val_loss", run="variant")


def summarize(per_seed: list[dict]) -> list[dict]:
    """Per variant, the mean over seeds of every numeric column (None where any seed is None)."""
    return seed_means([r for s in per_seed for r in s["rows"]], "variant", digits=4)


def write_results(per_seed: list[dict], out: Path) -> list[Path]:
    """results.json (every seed), results.csv (one row per variant and seed, then the means
    over seeds) and adaptive.png (first seed's curves; sweep and dispatch: means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(per_seed)
    paths = write_seed_results(out, per_seed, summary)
    first = per_seed[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    for n, c in first["curves"].items():
        axes[0].plot(c["steps"], c["val_loss"], label=n)
    axes[0].axhline(first["targets"]["final"], color="k", ls=":", lw=1, label="top-2 final")
    axes[0].set(
        xlabel="step",
        ylabel="validation loss",
        yscale="log",
        title=f"Quality over training (seed {first['setup']['seed']})",
    )
    axes[0].legend(fontsize=7)
    sweep = [r for r in summary if re.fullmatch(r"adaptive T=[\d.]+", r["variant"])]
    ts = [float(r["variant"].split("=")[1]) for r in sweep]
    axes[1].plot(ts, [r["two_expert_share"] for r in sweep], "o-", label="share on two experts")
    axes[1].plot(ts, [r["flop_ratio"] for r in sweep], "s-", label="expert FLOPs / top-2")
    axes[1].plot(ts, [r["step_time_ratio"] for r in sweep], "^-", label="step time / top-2")
    axes[1].axhspan(0.11, 0.26, color="tab:green", alpha=0.15, label="paper: 11-26% on two")
    axes[1].set(xlabel="threshold T", title=f"Threshold sweep (mean of {len(per_seed)} seeds)")
    axes[1].legend(fontsize=7)
    flops = [d["flop_ratio"] for d in first["dispatch"]]
    times = [
        statistics.fmean(r["dispatch"][i]["time_ratio"] for r in per_seed)
        for i in range(len(flops))
    ]
    axes[2].plot(flops, times, "o-", label="measured (experts, fwd+bwd)")
    axes[2].plot([0.5, 1], [0.5, 1], "k--", lw=1, label="time = FLOPs")
    axes[2].plot(
        [0.5, 0.6, 0.75, 0.9], [0.67, 0.76, 0.92, 0.97], "x:", label="paper, Table 1 (GPU)"
    )
    axes[2].set(
        xlabel="expert FLOPs / top-2", ylabel="time / top-2", title="Experts: time vs FLOPs"
    )
    axes[2].legend(fontsize=7)
    fig.savefig(out / "adaptive.png", dpi=110)
    plt.close(fig)
    return [*paths, out / "adaptive.png"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adaptive", help="adaptive gating vs top-2, threshold sweep, curriculum")
    add_setup_args(
        p, Setup(steps=600)
    )  # the notebook's Setup, trained three times as long, on three seeds
    p.add_argument(
        "--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2], action=DistinctSeeds
    )
    p.add_argument("--thresholds", type=non_negative, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--timing-repeats", type=positive_int, default=20)
    add_experiment_args(p, out="runs/adaptive")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> list[dict]:
    set_threads(args)
    per_seed = []
    for seed in args.seeds:
        print(f"seed {seed}: training {len(args.thresholds) + 4} variants", flush=True)
        per_seed.append(
            compare(
                setup_from_args(Setup, args, seed),
                args.thresholds,
                args.timing_repeats,
                progress=not args.no_progress,
            )
        )
    print(f"means over seeds {args.seeds}:")
    print(
        f"{'variant':<28} {'val loss':>8} {'on two':>7} {'FLOPs':>6} {'time':>6} {'steps to top-2 loss':>20}"
    )
    for r in summarize(per_seed):
        print(
            f"{r['variant']:<28} {r['final_val_loss']:>8.3f} {r['two_expert_share']:>7.1%} "
            f"{r['flop_ratio']:>6.2f} {r['step_time_ratio']:>6.2f} {r['steps_to_top2_final_loss']!s:>20}"
        )
    for path in write_results(per_seed, args.out):
        print(f"wrote {path}")
    return per_seed

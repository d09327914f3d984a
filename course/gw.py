"""GW-MoE fine-tuning, plain vs GW from one checkpoint (chapter 3; ``python -m course gw``).

The set-up: a tiny byte-level MoE language model is pretrained on seven of the eight plays in
the course's text (``load_text()``); the downstream task is next-byte prediction on the eighth, The Tempest,
which it has never seen (new characters, names and words). Every run starts
from the same checkpoint; runs differ only in the fine-tuning recipe (``GWFineTuning``) and
the seed. The metric is the per-byte cross-entropy (and accuracy) on a held-out part of the
play, on all tokens and on the tokens the pretrained router is uncertain about.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from torch import nn

from course.common import (
    add_experiment_args,
    cached,
    interleaved,
    load_json,
    seed_means,
    set_threads,
    write_csv,
)
from minimoe.cli import (
    UsageError,
    non_negative,
    non_negative_int,
    positive,
    positive_int,
    write_json,
)
from minimoe.data import BYTE_VOCAB_SIZE, Batch, ByteCorpus, byte_corpus, lm_batches, load_text
from minimoe.layer import MoEConfig
from minimoe.model import ModelConfig, TinyTransformer
from minimoe.routing import TopK
from minimoe.train import (
    History,
    TrainConfig,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    train,
)
from minimoe.uncertainty import (
    GWFineTuning,
    record_routing,
    swapped_first_choice,
    uncertain_in_any_layer,
)

CHECKPOINT = "gw_pretrained.pt"  # in data/ (``common.cached``); see data/README.md
RESULTS = "gw_results.json"  # the bigger run of ``compare``, in data/
HELD_OUT = "THE TEMPEST"  # the downstream play; the pretraining text is the other seven
THRESHOLD = 0.75  # normalized entropy; the released code uses 1.6 nats (0.77 of ln 8) on GLUE, 1.8 (0.87) for generation
PRETRAIN_STEPS = 2000
METRICS = ("loss_all", "loss_uncertain", "acc_all", "acc_uncertain")
SWAP_METRICS = ("swap_all", "swap_uncertain")  # runs made since the swap measurement


def model_config() -> ModelConfig:
    """2 layers, d_model 64, 8 experts of width 64, top-2 (about 0.27 M parameters)."""
    return ModelConfig(
        n_layers=2,
        n_heads=4,
        block_size=64,
        moe=MoEConfig(d_model=64, d_hidden=64, num_experts=8, router=TopK(k=2)),
    )


RELEASED_BALANCE = 1e-3  # the released code's auxiliary-loss coefficient in fine-tuning


def recipes(
    threshold: float = THRESHOLD,
    freeze_router: bool = True,
    z_loss: bool = False,
    balance_coef: float | None = RELEASED_BALANCE,
) -> dict[str, GWFineTuning]:
    """The three fine-tuning runs compared: same switches (by default the released code's:
    router frozen, z-loss off, balance loss 1e-3; None keeps the model's), different broadcast."""
    switches = {"freeze_router": freeze_router, "z_loss": z_loss, "balance_coef": balance_coef}
    return {
        "plain": GWFineTuning(None, **switches),
        "gw_uncertain": GWFineTuning(threshold, **switches),
        "gw_all": GWFineTuning(0.0, **switches),
    }


# ---- data -------------------------------------------------------------------------------


def split_plays(text: str | None = None, held_out: str = HELD_OUT) -> tuple[str, str]:
    """(the other plays, the held-out play); plays start with their title line then 'by'."""
    text = load_text() if text is None else text
    starts = sorted(text.find(t) for t in _titles(text))
    begin = text.find(f"{held_out}\n\nby")
    if begin < 0:
        raise ValueError(f"no play titled {held_out!r} in the text")
    end = next((s for s in starts if s > begin), len(text))
    return text[:begin] + text[end:], text[begin:end]


def _titles(text: str) -> list[str]:
    lines = text.split("\n")
    return [
        lines[i] + "\n\nby"
        for i in range(len(lines) - 2)
        if lines[i + 2].startswith("by William Shakespeare") and not lines[i + 1]
    ]


def corpora(val_frac: float = 0.2) -> tuple[ByteCorpus, ByteCorpus]:
    """(pretraining corpus: the other plays, 5% val; downstream corpus: the held-out play)."""
    others, play = split_plays()
    return byte_corpus(others, val_frac=0.05), byte_corpus(play, val_frac=val_frac)


def eval_batch(corpus: ByteCorpus, block_size: int = 32, max_windows: int | None = None) -> Batch:
    """The validation split cut into consecutive windows (no randomness): {idx, targets}."""
    n = (len(corpus.val) - 1) // block_size
    n = min(n, max_windows) if max_windows else n
    idx = corpus.val[: n * block_size].view(n, block_size)
    targets = corpus.val[1 : n * block_size + 1].view(n, block_size)
    return {"idx": idx, "targets": targets}


# ---- pretraining and fine-tuning -------------------------------------------------------


def pretrain(
    steps: int = PRETRAIN_STEPS,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[TinyTransformer, History]:
    """Train the tiny model from scratch on the pretraining plays."""
    seed_everything(seed)
    pre, _ = corpora()
    model = TinyTransformer(model_config()).to(device)
    history = train(
        model,
        lm_batches(pre, batch_size, model.config.block_size),
        TrainConfig(steps=steps, lr=lr, seed=seed, progress=progress),
    )
    return model.cpu(), history


def load_pretrained(path: str | Path | None = None) -> TinyTransformer:
    """The shipped pretrained model (data/gw_pretrained.pt), or another checkpoint saved by
    ``pretrain``, in eval mode."""
    model = load_checkpoint(cached(CHECKPOINT) if path is None else path)
    if not isinstance(model, TinyTransformer) or model.config.vocab_size != BYTE_VOCAB_SIZE:
        what = type(model).__name__
        if isinstance(model, TinyTransformer):
            what += f" with vocab_size={model.config.vocab_size}"
        raise ValueError(
            f"checkpoint {path} holds a {what}; GW fine-tuning needs a byte-level "
            f"TinyTransformer (vocab_size={BYTE_VOCAB_SIZE}), as pretrain saves"
        )
    return model


def load_cached(path: str | Path | None = None) -> dict:
    """Results of the command (``{config, rows}``); by default the shipped data/gw_results.json."""
    return load_json(path, RESULTS)


def finetune(
    pretrained: nn.Module,
    recipe: GWFineTuning,
    corpus: ByteCorpus,
    *,
    steps: int = 100,
    batch_size: int = 16,
    block_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[nn.Module, History, dict[str, list[float]]]:
    """A fine-tuned copy of ``pretrained`` (left untouched) under ``recipe``, its History, and
    per MoE layer, averaged over the steps, the shares of tokens ``uncertain_ratio`` (over the
    threshold: the released code's gw_ratio) and ``broadcast_ratio`` (after the slot cap)."""
    model = recipe.apply(copy.deepcopy(pretrained)).to(device)
    ratios: dict[str, list[list[float]]] = {"uncertain_ratio": [], "broadcast_ratio": []}

    def record(step: int, m: nn.Module, out) -> None:
        for name, per_step in ratios.items():
            per_step.append([getattr(layer.stats, name).item() for layer in out.layers])

    history = train(
        model,
        lm_batches(corpus, batch_size, block_size),
        TrainConfig(
            steps=steps, lr=lr, seed=seed, freeze_router=recipe.freeze_router, progress=progress
        ),
        callback=record,
    )
    return model, history, {k: np.mean(v, axis=0).tolist() if v else [] for k, v in ratios.items()}


# ---- evaluation -------------------------------------------------------------------------


@torch.no_grad()
def token_metrics(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per target byte (B * L,): cross-entropy in nats and whether the argmax is right; and the
    expert FLOPs per token of this evaluation pass (from the MoE layers' stats)."""
    model.eval()
    device = next(model.parameters()).device
    out = model(idx=batch["idx"].to(device))
    logits = out.logits.flatten(0, 1).float().cpu()  # (T, vocab)
    targets = batch["targets"].flatten()
    flops = sum(layer.stats.flops.item() for layer in out.layers) / len(targets)
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(1) == targets, flops


def uncertain_tokens(
    model: nn.Module,
    batch: Batch,
    threshold: float = THRESHOLD,
    measure: str = "normalized_entropy",
) -> torch.Tensor:
    """(B * L,) bool: the model's router is uncertain about the token in some MoE layer."""
    device = next(model.parameters()).device
    _, routings = record_routing(model, {"idx": batch["idx"].to(device)})
    return uncertain_in_any_layer(routings, threshold, measure)


def evaluate(model: nn.Module, batch: Batch, uncertain: torch.Tensor) -> dict[str, float]:
    """Mean loss and accuracy on all tokens and on the ``uncertain`` ones (a fixed set), the
    evaluation's expert FLOPs per token, and GW-MoE's claim measured directly: ``swap_*``, the
    mean loss increase when every layer sends each token to its best unchosen expert instead
    of its first choice (lower = less sensitive to the choice)."""
    loss, correct, flops = token_metrics(model, batch)
    with swapped_first_choice(model):
        swapped, _, _ = token_metrics(model, batch)
    return {
        "swap_all": (swapped - loss).mean().item(),
        "swap_uncertain": (swapped - loss)[uncertain].mean().item(),
        "loss_all": loss.mean().item(),
        "loss_uncertain": loss[uncertain].mean().item(),
        "acc_all": correct.float().mean().item(),
        "acc_uncertain": correct[uncertain].float().mean().item(),
        "eval_flops_per_token": flops,
    }


def compare(
    pretrained: nn.Module,
    corpus: ByteCorpus,
    seeds: list[int],
    runs: dict[str, GWFineTuning] | None = None,
    threshold: float = THRESHOLD,
    block_size: int = 32,
    max_windows: int | None = None,
    **finetune_kw,
) -> list[dict]:
    """Fine-tune every recipe with every seed from the same checkpoint; one row per run.

    The uncertain tokens of the metric are fixed once, by the pretrained router at
    ``threshold``, so every run is scored on the same tokens. Row 'pretrained' (seed -1)
    is the checkpoint itself. Evaluation windows are ``block_size`` long, as in fine-tuning.
    """
    runs = recipes(threshold) if runs is None else runs
    batch = eval_batch(corpus, block_size, max_windows)
    uncertain = uncertain_tokens(pretrained, batch, threshold)
    rows = [
        {
            "run": "pretrained",
            "seed": -1,
            "train_seconds": 0.0,
            **evaluate(pretrained, batch, uncertain),
        }
    ]
    for seed in seeds:
        for name, recipe in runs.items():  # interleaved, so machine load hits every run alike
            start = time.perf_counter()
            model, history, ratios = finetune(
                pretrained, recipe, corpus, seed=seed, block_size=block_size, **finetune_kw
            )
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "run": name,
                    "seed": seed,
                    "train_seconds": seconds,
                    "final_train_loss": float(np.mean(history.loss[-10:])),
                    **{k: [round(r, 4) for r in v] for k, v in ratios.items()},
                    **evaluate(model.cpu(), batch, uncertain),
                }
            )
    return rows


def summarize(
    rows: list[dict], metrics: tuple[str, ...] = METRICS
) -> dict[str, dict[str, tuple[float, float]]]:
    """run -> metric -> (mean, standard deviation over seeds; 0 for a single run)."""
    means = seed_means(rows, "run", metrics, std=metrics)
    return {r["run"]: {m: (r[m], r[f"{m}_std"]) for m in metrics} for r in means}


def paired_gain(
    rows: list[dict], run: str, baseline: str = "plain", metric: str = "loss_all"
) -> np.ndarray:
    """baseline - run, seed by seed (positive = ``run`` has the lower loss)."""
    by_seed = {r["seed"]: r[metric] for r in rows if r["run"] == baseline}
    return np.array([by_seed[r["seed"]] - r[metric] for r in rows if r["run"] == run])


@torch.no_grad()
def inference_cost(
    models: dict[str, nn.Module], batch: Batch, repeats: int = 5, reference: str | None = None
) -> dict[str, dict[str, float | str]]:
    """Evaluation FLOPs per token (from the layers' stats) and seconds per token (median of
    ``repeats`` rounds, the models interleaved so load on the machine hits all alike); with
    ``reference``, also ``time_ratio``: the median over rounds of each model's time over the
    reference's in the same round, and ``time_band``, that ratio with its quartiles as text
    (for printing: a timing is never asserted)."""
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {list(models)}")
    flops: dict[str, float] = {}
    tokens = batch["idx"].numel()

    def run(name: str, m: nn.Module):
        idx = batch["idx"].to(next(m.parameters()).device)

        def forward() -> None:
            out = m(idx=idx)
            flops[name] = sum(layer.stats.flops.item() for layer in out.layers) / tokens

        return forward

    for m in models.values():
        m.eval()
    device = next(next(iter(models.values())).parameters()).device if models else "cpu"
    times = interleaved({n: run(n, m) for n, m in models.items()}, repeats, device=device)
    cost = {
        n: {"flops_per_token": flops[n], "seconds_per_token": times[n] / tokens} for n in models
    }
    if reference is not None:
        for n in models:
            cost[n]["time_ratio"] = times.ratio(n, reference)
            cost[n]["time_band"] = times.band(n, reference)  # for printing: the noise band
    return cost


# ---- command line -----------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gw", help="GW-MoE: plain vs GW fine-tuning from one pretrained checkpoint")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="pretrained model to fine-tune (default: the shipped data/gw_pretrained.pt)",
    )
    p.add_argument(
        "--pretrain",
        action="store_true",
        help="pretrain from scratch instead of loading --checkpoint",
    )
    p.add_argument(
        "--pretrain-only", action="store_true", help="pretrain, save the model, and stop"
    )
    p.add_argument("--pretrain-steps", type=non_negative_int, default=PRETRAIN_STEPS)
    p.add_argument(
        "--save-pretrained",
        type=Path,
        default=None,
        help="where to save the pretrained model (default: OUT/pretrained.pt)",
    )
    p.add_argument("--seeds", type=positive_int, default=5, help="seeds 0 to N - 1")
    p.add_argument("--steps", type=non_negative_int, default=300, help="fine-tuning steps per run")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--block-size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive, default=1e-3)
    p.add_argument(
        "--threshold", type=non_negative, default=THRESHOLD, help="normalized entropy threshold"
    )
    p.add_argument(
        "--train-router",
        action="store_true",
        help="let the router learn during fine-tuning (the released code freezes it)",
    )
    p.add_argument(
        "--z-loss",
        action="store_true",
        help="keep the router z-loss (the released code turns it off)",
    )
    p.add_argument(
        "--balance-coef",
        type=non_negative,
        default=RELEASED_BALANCE,
        help="balance-loss coefficient while fine-tuning (default: the released code's %(default)s)",
    )
    p.add_argument(
        "--eval-windows",
        type=positive_int,
        default=None,
        help="score only the first N held-out windows (default: all)",
    )
    add_experiment_args(p, out="runs/gw")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> list[dict]:
    set_threads(args)
    if args.pretrain or args.pretrain_only:
        model, _ = pretrain(args.pretrain_steps, device=args.device, progress=not args.no_progress)
        path = args.save_pretrained or args.out / "pretrained.pt"
        save_checkpoint(model, path, pretrain_steps=args.pretrain_steps)
        print(f"wrote {path} ({Path(path).stat().st_size / 1e6:.2f} MB)")
        if args.pretrain_only:
            return []
    else:
        try:
            model = load_pretrained(args.checkpoint)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--checkpoint {args.checkpoint}: {err}") from None
    _, corpus = corpora()
    runs = recipes(
        args.threshold,
        freeze_router=not args.train_router,
        z_loss=args.z_loss,
        balance_coef=args.balance_coef,
    )
    rows = compare(
        model.to(args.device),
        corpus,
        list(range(args.seeds)),
        runs,
        threshold=args.threshold,
        max_windows=args.eval_windows,
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        lr=args.lr,
        device=args.device,
        progress=not args.no_progress,
    )
    skip = ("func", "command", "out", "no_progress")  # how to run, not what was run
    config = {
        k: v.name if isinstance(v, Path) else v for k, v in vars(args).items() if k not in skip
    }
    config["checkpoint"] = Path(args.checkpoint or CHECKPOINT).name
    write_results(rows, args.out, config)
    return rows


def write_results(rows: list[dict], out: Path, config: dict | None = None) -> None:
    """results.json ({config, rows}), results.csv (one row per run), summary.json, and plots."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows, METRICS + SWAP_METRICS)
    write_json(out / "results.json", {"config": config or {}, "rows": rows})
    write_json(out / "summary.json", summary)
    write_csv(out / "results.csv", rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), layout="constrained")
    plot_comparison(summary, ax=axes[0])
    plot_gains(rows, ax=axes[1])
    fig.savefig(out / "gw_metrics.png", dpi=120)
    plt.close(fig)
    for name, s in summary.items():
        shown = METRICS + SWAP_METRICS
        print(f"{name:>13}: " + "  ".join(f"{m} {s[m][0]:.4f} ± {s[m][1]:.4f}" for m in shown))
    print(f"wrote {out}/results.json, results.csv, summary.json, gw_metrics.png")


LABELS = {"loss_all": "all tokens", "loss_uncertain": "uncertain tokens"}


def plot_comparison(
    summary: dict[str, dict[str, tuple[float, float]]], ax: Axes | None = None
) -> Axes:
    """Bars: held-out loss on all and on uncertain tokens per run, error bars = std over seeds."""
    ax = ax if ax is not None else plt.subplots(figsize=(6, 3), layout="constrained")[1]
    names = [n for n in summary if n != "pretrained"]
    x = np.arange(len(names))
    for i, metric in enumerate(LABELS):
        mean = [summary[n][metric][0] for n in names]
        std = [summary[n][metric][1] for n in names]
        ax.bar(x + (i - 0.5) * 0.4, mean, 0.4, yerr=std, capsize=3, label=LABELS[metric])
    ax.set(  # bars from zero: the runs differ by hundredths, which the right panel shows
        xticks=x,
        xticklabels=names,
        ylabel="held-out loss (nats/byte)",
        ylim=(0, None),
        title="Fine-tuned: mean ± std over seeds",
    )
    ax.legend(fontsize=8)
    return ax


GAIN_LABELS = LABELS | {"swap_uncertain": "swap sensitivity, uncertain tokens"}


def plot_gains(rows: list[dict], ax: Axes | None = None) -> Axes:
    """Dots: plain minus GW per seed (above 0: GW better), for the loss on all and on uncertain
    tokens and, where measured, the loss increase when uncertain tokens' first choice is swapped
    (GW-MoE's claim: lower after GW fine-tuning, so above 0 here)."""
    ax = ax if ax is not None else plt.subplots(figsize=(6, 3), layout="constrained")[1]
    names = [n for n in dict.fromkeys(r["run"] for r in rows) if n not in ("pretrained", "plain")]
    metrics = [m for m in GAIN_LABELS if all(m in r for r in rows)]
    width = 0.6 / len(metrics)
    for i, metric in enumerate(metrics):
        for j, name in enumerate(names):
            g = paired_gain(rows, name, metric=metric)
            ax.scatter(
                np.full(len(g), j + (i - (len(metrics) - 1) / 2) * width),
                g,
                color=f"C{i}",
                label=GAIN_LABELS[metric] if j == 0 else None,
            )
    ax.axhline(0, color="k", lw=1)
    ax.set(
        xticks=range(len(names)),
        xticklabels=names,
        xlim=(-0.5, len(names) - 0.5),
        ylabel="plain - GW (nats)",
        title="Per seed: above 0 means GW is better",
    )
    ax.legend(fontsize=8)
    return ax

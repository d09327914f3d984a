"""GW-MoE fine-tuning against plain fine-tuning (chapter 3; ``python -m course gw``), on the
experiment harness (``course.harness``).

A tiny byte-level MoE language model is pretrained on seven of the eight plays of the course's
text (``load_text()``); the downstream task is next-byte prediction on the eighth, The Tempest,
which it has never seen (new characters, names and words). Two pretrained arms: top-2 (Mixtral's
renormalized weights) and Switch's top-1 (the router the released GW-MoE code fine-tunes). From
each arm's model of a seed, three fine-tuning runs with the released code's switches (router
frozen, z-loss off, balance loss 1e-3) differ only in the broadcast: none ("plain"), the tokens
whose pretrained router is uncertain ("GW"), every token ("GW all"). A seed fixes the
pretraining (weights and batches) and the fine-tuning batches, so the seeds vary the pretrained
model too. Measured on the held-out last 20% of the play: per-byte cross-entropy and accuracy on
all bytes and on the bytes the seed's pretrained router is uncertain about, and the loss
increase when each byte's first choice is swapped (GW-MoE's claim: lower after GW).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from torch import nn

from course import harness, stats
from course.common import cached, interleaved
from course.harness import Run
from minimoe.data import BYTE_VOCAB_SIZE, Batch, ByteCorpus, byte_corpus, lm_batches, load_text
from minimoe.layer import MoEConfig
from minimoe.model import ModelConfig, TinyTransformer
from minimoe.routing import GWBroadcast, TopK
from minimoe.train import History, TrainConfig, load_checkpoint, save_checkpoint, seed_everything
from minimoe.uncertainty import record_routing, swapped_first_choice, uncertain_in_any_layer

CHECKPOINT = "gw_pretrained.pt"  # in data/ (``common.cached``): top-2's seed-0 pretrained model
HELD_OUT = "THE TEMPEST"  # the downstream play; the pretraining text is the other seven
THRESHOLD = 0.75  # normalized entropy; the released code uses 1.6 nats (0.77 of ln 8) on GLUE, 1.8 (0.87) for generation
RELEASED_BALANCE = 1e-3  # the released code's auxiliary-loss coefficient in fine-tuning
METRICS = ("loss_all", "loss_uncertain", "acc_all", "acc_uncertain", "swap_all", "swap_uncertain")

ARMS = {"top-2": TopK(k=2), "switch": TopK(k=1, renormalize=False)}  # Mixtral's, Switch's
RECIPES = {"plain": None, "GW": THRESHOLD, "GW all": 0.0}  # broadcast threshold (None: none)


def fine_tuning(arm: str, threshold: float | None) -> Run:
    """The released code's fine-tuning of ``arm``'s pretrained model: router frozen, z-loss
    off, balance loss 1e-3; GW broadcast at ``threshold`` (None: plain, the same switches)."""
    base = ARMS[arm]
    router = base if threshold is None else GWBroadcast(base, threshold=threshold)
    return Run(
        router,
        losses="course",
        moe={"z_coef": 0.0, "balance_coef": RELEASED_BALANCE},
        train={"freeze_router": True},
        continues=arm,
    )


# each arm's pretraining first (the course's losses: balance 1e-2, z-loss 1e-3), then its three
RUNS: dict[str, Run] = {}
for _arm, _base in ARMS.items():
    RUNS[_arm] = Run(_base, losses="course")
    RUNS |= {f"{_arm} {r}": fine_tuning(_arm, t) for r, t in RECIPES.items()}
FINETUNED = [n for n, r in RUNS.items() if r.continues is not None]
CLAIMS = ("loss_all", "loss_uncertain", "swap_uncertain")  # what GW should lower
# the chapter's family (paired by seed, Holm-corrected together): each broadcast against plain
# fine-tuning of its arm, on the claims
FAMILY = [
    (f"{arm} {recipe}", f"{arm} plain", measure)
    for arm in ARMS
    for recipe in ("GW", "GW all")
    for measure in CLAIMS
]


def model_config(moe: MoEConfig | None = None) -> ModelConfig:
    """2 layers, d_model 64, 8 experts of width 64, top-2 by default (about 0.27 M parameters)."""
    moe = moe or MoEConfig(d_model=64, d_hidden=64, num_experts=8, router=TopK(k=2))
    return ModelConfig(n_layers=2, n_heads=4, block_size=64, moe=moe)


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


# ---- evaluation -------------------------------------------------------------------------


def load_pretrained(path: str | Path | None = None) -> TinyTransformer:
    """The shipped pretrained model (data/gw_pretrained.pt: top-2's of seed 0, as the
    experiment trains it), or another checkpoint saved by ``--save-pretrained``, in eval mode."""
    model = load_checkpoint(cached(CHECKPOINT) if path is None else path)
    if not isinstance(model, TinyTransformer) or model.config.vocab_size != BYTE_VOCAB_SIZE:
        what = type(model).__name__
        if isinstance(model, TinyTransformer):
            what += f" with vocab_size={model.config.vocab_size}"
        raise ValueError(
            f"checkpoint {path} holds a {what}; GW fine-tuning needs a byte-level "
            f"TinyTransformer (vocab_size={BYTE_VOCAB_SIZE}), as pretraining saves"
        )
    return model


class LayerShares:
    """A training callback: per step and MoE layer, the shares of tokens over the GW threshold
    and broadcast (the layers' stats)."""

    KEYS = ("uncertain_ratio", "broadcast_ratio")

    def __init__(self) -> None:
        self.steps: dict[str, list[list[float]]] = {k: [] for k in self.KEYS}

    def __call__(self, step: int, model: nn.Module, out: Any) -> None:
        for key, per_step in self.steps.items():
            per_step.append([getattr(layer.stats, key).item() for layer in out.layers])

    def means(self) -> dict[str, list[float]]:
        """Per key, the mean over the steps per layer (4 decimals)."""
        return {k: np.round(np.mean(v, axis=0), 4).tolist() for k, v in self.steps.items()}


# ---- the experiment -----------------------------------------------------------------------


@dataclass
class GWSetup:
    """Pretraining (batch 32 x 64 bytes, lr 3e-3) on the seven plays, then fine-tuning (batch
    16 x 32, lr 1e-3) on The Tempest; constant learning rates, AdamW (the trainer's)."""

    pretrain_steps: int = 2000
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    finetune_steps: int = 600
    batch_size: int = 16
    block_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"

    @property
    def steps(self) -> int:
        """A fine-tuning run ends here, counted from the start of its pretraining."""
        return self.pretrain_steps + self.finetune_steps


class GWExperiment(harness.Experiment):
    """Chapter 3's runs: two pretrained arms, each fine-tuned three ways from its seed's model."""

    name = "gw"
    setup_class = GWSetup
    runs = RUNS
    seeds = tuple(range(10))  # ten pretrained models per arm: GW's gap on top-2 is small
    curve_from_branch = True  # fine-tuning is another task: its curve counts its own steps
    help = "GW-MoE: top-2 and Switch pretrained, then plain vs GW fine-tuning on an unseen play"

    def __init__(self, setup: GWSetup | None = None) -> None:
        super().__init__(setup)
        self._uncertain: dict[tuple[str, int], torch.Tensor] = {}

    def continue_at(self) -> int:
        return self.setup.pretrain_steps

    def last_step(self, name: str) -> int:
        return (
            self.setup.pretrain_steps
            if self.runs[name].continues is None
            else super().last_step(name)
        )

    def base_moe(self) -> MoEConfig:
        return model_config().moe

    def model(self, moe: MoEConfig, seed: int) -> TinyTransformer:
        seed_everything(seed)
        return TinyTransformer(model_config(moe))

    def data(self, seed: int):
        """The pretraining batches; held out: The Tempest's last 20% in consecutive windows."""
        s = self.setup
        pre, play = corpora()
        return lm_batches(pre, s.pretrain_batch_size, 64), eval_batch(play, s.block_size)

    def batches(self, get_batch, model):
        """A fine-tuning run trains on The Tempest's first 80% instead."""
        if self.runs[self.current[0]].continues is None:
            return get_batch
        return lm_batches(corpora()[1], self.setup.batch_size, self.setup.block_size)

    def train_config(
        self, run: Run, seed: int, progress: bool, steps: int | None = None, start: int = 0
    ) -> TrainConfig:
        """Pretraining: its own steps and learning rate, 8 evaluations; fine-tuning: 12."""
        s = self.setup
        config = super().train_config(run, seed, progress, steps, start)
        if run.continues is None:
            steps = s.pretrain_steps if steps is None else steps
            return replace(config, steps=steps, lr=s.pretrain_lr, eval_every=s.pretrain_steps // 8)
        return replace(config, eval_every=max(1, s.finetune_steps // 12))

    def uncertain(self, seed: int, held_out: Batch, model: nn.Module | None = None) -> torch.Tensor:
        """The scored set of the run being trained: the held-out bytes its arm's pretrained
        router (the model at the branch) is uncertain about in some layer; for a pretraining
        run, its own router's (``model``)."""
        source = self.runs[self.current[0]].continues
        if source is None:
            return uncertain_tokens(model, held_out)
        if (source, seed) not in self._uncertain:
            self._uncertain[(source, seed)] = uncertain_tokens(
                self.pretrained(source, seed), held_out
            )
        return self._uncertain[(source, seed)]

    def evaluate(self, model: nn.Module, held_out: Batch) -> dict[str, float]:
        return evaluate(model, held_out, self.uncertain(self.current[1], held_out, model))

    def recorder(self, name: str) -> LayerShares:
        return LayerShares()

    def extra(
        self, model: nn.Module, held_out: Batch, history: History, record: LayerShares
    ) -> dict:
        """Per MoE layer, averaged over the steps: the shares of tokens over the threshold
        (``uncertain_ratio``, the released code's gw_ratio) and broadcast (``broadcast_ratio``);
        and the last 10 steps' training loss."""
        return record.means() | {"final_train_loss": float(np.mean(history.loss[-10:]))}

    def pretrained(self, arm: str = "top-2", seed: int = 0) -> TinyTransformer:
        """``arm``'s pretrained model of ``seed`` (trained here unless kept), in eval mode."""
        if arm not in ARMS:
            raise ValueError(f"arm must be one of {list(ARMS)}, got {arm!r}")
        key, current = (arm, seed, self.continue_at()), self.current
        if key not in self._snapshots:
            self._train(arm, seed, False, self.continue_at())
            self.current = current
        model = self.initial_model(arm, seed)  # the seed's draw, then the weights at the branch
        model.load_state_dict(self._snapshots[key])
        return model.eval()

    def add_parser(self, sub):
        p = super().add_parser(sub)
        p.add_argument(
            "--save-pretrained",
            type=Path,
            default=None,
            help=f"also save top-2's pretrained model of seed 0 there (data/{CHECKPOINT})",
        )
        return p

    def run_args(self, args: argparse.Namespace) -> harness.Results:
        """The harness's runs, then ``--save-pretrained`` from the same training."""
        results = super().run_args(args)
        if args.save_pretrained is not None:
            path = args.save_pretrained
            model = self.pretrained("top-2", 0)
            save_checkpoint(model, path, pretrain_steps=self.setup.pretrain_steps)
            print(f"wrote {path} ({Path(path).stat().st_size / 1e6:.2f} MB)")
        return results


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


# ---- results ----------------------------------------------------------------------------


def load(path: str | Path | None = None) -> harness.Results:
    """The cached runs (data/gw/results.json), checked against the declared ones."""
    return harness.load(GWExperiment(), path)


def family(results: harness.Results) -> list[stats.Comparison]:
    """The chapter's comparisons (``FAMILY``), paired by seed, Holm-corrected together."""
    return results.family(FAMILY)


def summary(results: harness.Results, measures: tuple[str, ...] = METRICS) -> list[dict]:
    """Per run (declared order): mean and standard deviation over seeds of ``measures``."""
    rows = []
    for run in [n for n in RUNS if n in results.runs]:
        row: dict[str, Any] = {"run": run, "seeds": len(results.seeds_of(run))}
        for m in measures:
            values = np.array(results.values(run, m))
            row[m], row[f"{m}_std"] = values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


LABELS = {
    "loss_all": "loss, all bytes",
    "loss_uncertain": "loss, uncertain bytes",
    "swap_uncertain": "swap cost, uncertain bytes",
}


def plot_family(comparisons: list[stats.Comparison], ax: Axes | None = None) -> Axes:
    """GW minus plain per seed (dots) with the Holm-corrected 95% interval (bar), one row per
    comparison of the family; left of 0 is GW lower (its claim: better)."""
    ax = ax if ax is not None else plt.subplots(figsize=(7, 4), layout="constrained")[1]
    for i, c in enumerate(comparisons):
        color = f"C{list(LABELS).index(c.measure)}" if c.measure in LABELS else "gray"
        ax.plot([c.low, c.high], [i, i], color=color, lw=3, alpha=0.5)
        ax.scatter(c.diffs, [i] * c.n, color=color, s=12, zorder=3)
        ax.scatter([c.mean], [i], color="k", marker="|", s=150, zorder=4)
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(range(len(comparisons)), [f"{c.a} - {c.b}: {c.measure}" for c in comparisons])
    ax.invert_yaxis()
    ax.set(xlabel="difference per seed (nats); bar: Holm-corrected 95% interval")
    return ax


def plot_curves(results: harness.Results, arm: str, measure: str = "loss_all", ax=None) -> Axes:
    """``arm``'s fine-tuning runs: held-out ``measure`` against fine-tuning step, mean over
    seeds (the converged rule reads the last fifth)."""
    ax = ax if ax is not None else plt.subplots(figsize=(5, 3.5), layout="constrained")[1]
    for name in [n for n in FINETUNED if n.startswith(f"{arm} ")]:
        curves = [results.curve(name, s, measure) for s in results.seeds_of(name)]
        steps = sorted(curves[0])
        ax.plot(steps, [np.mean([c[t] for c in curves]) for t in steps], label=name)
    ax.set(xlabel="fine-tuning step", ylabel=f"held-out {LABELS.get(measure, measure)}", title=arm)
    ax.legend(fontsize=8)
    return ax


def add_parser(sub: argparse._SubParsersAction) -> None:
    GWExperiment().add_parser(sub)

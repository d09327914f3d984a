"""Top-P's and adaptive gating's difficulty claims on text (``python -m course text``), on the
experiment harness.

Chapters 4 and 5 ask "do harder inputs get more experts?" on token tasks whose difficulty is
the task, and on the known-answer testbed. Here the inputs are the course's text and a
position's difficulty is how badly a model predicts its next byte: the held-out positions are
cut into fifths of their loss under the same seed's **top-2** model (one grouping for every
router of that seed, fixed by top-2, which runs first).

Chapter 1's byte-level language model (``course.lm.ByteLM``: for one seed every run starts from
the same weights and sees the same batches; 1200 steps decaying to zero, dropless). Every router
runs with its paper's own losses (balance 1e-2 counted as its paper counts, no z-loss; top-p adds
its dynamic loss 1e-4): top-2, top-2 without renormalization (adaptive gating's control), top-p
0.4 and adaptive gating 0.1, by the testbed's names. Measured on the held-out windows every 100
steps: loss, experts per token, MaxVio_global; and at the end (``extra``) experts per token per
layer and per difficulty fifth, and the loss per fifth.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from course import harness, testbed
from course.harness import Run
from course.lm import ByteLM
from minimoe.analysis import RoutingRecorder
from minimoe.data import Batch
from minimoe.train import History

# the testbed's routers by the same names (top-1 left out), each with its paper's losses
RUNS: dict[str, Run] = {
    name: Run(testbed.ROUTERS[name]) for name in ("top-2", "top-2 raw", "top-p 0.4", "adaptive 0.1")
}
REFERENCE = "top-2"  # its per-position loss defines the difficulty fifths; declared first
QUINTILES = 5


@torch.no_grad()
def position_losses_and_routing(model: nn.Module, batches: list[Batch]) -> tuple[Tensor, Tensor]:
    """Per held-out position: the next-byte loss (T,), and experts per token per layer (L, T)."""
    model.eval()
    device = next(model.parameters()).device
    losses, counts = [], []
    for b in batches:
        with RoutingRecorder(model) as rec:
            logits = model(idx=b["idx"].to(device)).logits
        target = b["targets"].to(device).flatten()
        losses.append(F.cross_entropy(logits.flatten(0, 1), target, reduction="none").cpu())
        counts.append(torch.stack([rec.routing(i).expert_counts.float() for i in range(len(rec))]))
    return torch.cat(losses), torch.cat(counts, dim=1).cpu()


def quintiles(loss: Tensor) -> Tensor:
    """(T,) 0 (easiest fifth of the positions) to QUINTILES - 1 (hardest), by rank of ``loss``."""
    rank = loss.argsort().argsort()
    return rank * QUINTILES // len(loss)


class Text(ByteLM):
    name = "text"
    help = "chapters 4-5: top-p and adaptive gating on text, experts by difficulty"
    runs = RUNS

    def __init__(self, setup=None) -> None:
        super().__init__(setup)
        self._difficulty: dict[int, Tensor] = {}  # seed -> the fifth of every held-out position

    def difficulty(self, seed: int) -> Tensor:
        """The seed's top-2 fifths (top-2 is trained again if this experiment has not yet)."""
        if seed not in self._difficulty:
            self.trained(REFERENCE, seed)
        return self._difficulty[seed]

    def extra(self, model: nn.Module, held_out: list[Batch], history: History, record) -> dict:
        """Experts per token per layer and per difficulty fifth (easiest first), the loss per
        fifth; the fifths are top-2's of the same seed. None for a run cut short."""
        name, seed = self.current
        if len(history.loss) < self.setup.steps:  # its first steps only (a check of the cache)
            return {}
        loss, counts = position_losses_and_routing(model, held_out)
        if name == REFERENCE:
            self._difficulty[seed] = quintiles(loss)
        groups = self.difficulty(seed)
        self.current = (name, seed)  # (training top-2 again for the fifths moved it)
        ept = counts.mean(0)  # (T,) mean over layers
        return {
            "per_layer": counts.mean(1).tolist(),
            "by_quintile": [ept[groups == q].mean().item() for q in range(QUINTILES)],
            "loss_by_quintile": [loss[groups == q].mean().item() for q in range(QUINTILES)],
            "final_train_loss": statistics.fmean(history.loss[-50:]),
        }


def load(path=None) -> harness.Results:
    """The cached results (``data/text``), checked against the declared runs."""
    return harness.load(Text(), path)


def per_seed(results: harness.Results, run: str, key: str) -> list:
    """``extra[key]`` of ``run`` on every seed it has, in seed order."""
    return [results.record(run, s)["extra"][key] for s in results.seeds_of(run)]


def add_parser(sub) -> None:
    Text().add_parser(sub)

"""The byte-level language model the text chapters share, as an experiment of the harness.

A tiny ``TinyTransformer`` on the course's text (``byte_corpus()``: Shakespeare, the last 10%
held out), trained on random windows and measured on the first ``eval_windows`` consecutive
held-out windows. For one seed every run starts from the same weights (where the shapes agree)
and sees the same batches in the same order: only what the run changes differs. The learning
rate decays (cosine) to zero, so a run ends where it stops improving. A chapter subclasses
``ByteLM`` with its runs; ``bigram_loss`` is the floor any of its models must clear before a
claim about routing is worth reading.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import cache, partial

import torch
from torch import Tensor, nn

from course.adaptive import time_train_steps
from course.common import Timings, interleaved
from course.gw import eval_batch
from course.harness import Experiment
from minimoe.analysis import max_violation
from minimoe.data import BYTE_VOCAB_SIZE, Batch, ByteCorpus, byte_corpus, lm_batches
from minimoe.layer import MoEConfig
from minimoe.model import ModelConfig, TinyTransformer


@dataclass
class LMSetup:
    """The text chapters' scale: 2 layers, d_model 64, 8 SwiGLU experts of width 128."""

    n_layers: int = 2
    d_model: int = 64
    d_hidden: int = 128
    num_experts: int = 8
    block_size: int = 32
    batch_size: int = 32
    steps: int = 1200
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    eval_windows: int = 512
    seed: int = 0
    device: str = "cpu"


@cache
def corpus() -> ByteCorpus:
    return byte_corpus()


def held_out(setup: LMSetup) -> list[Batch]:
    """The first ``eval_windows`` consecutive held-out windows, in training-size batches."""
    batch = eval_batch(corpus(), setup.block_size, setup.eval_windows)
    return [dict(zip(batch, b)) for b in zip(*(v.split(setup.batch_size) for v in batch.values()))]


def bigram_loss(setup: LMSetup, smoothing: float = 0.5) -> float:
    """Held-out loss (nats per byte) of the training text's byte bigram model (additive
    smoothing), on the windows the models are measured on: the floor to clear."""
    train = corpus().train
    counts = torch.zeros(BYTE_VOCAB_SIZE, BYTE_VOCAB_SIZE)
    counts.index_put_((train[:-1], train[1:]), torch.ones(len(train) - 1), accumulate=True)
    logp = (counts + smoothing).log() - (counts + smoothing).sum(1, keepdim=True).log()
    losses = [-logp[b["idx"], b["targets"]].mean().item() for b in held_out(setup)]
    return statistics.fmean(losses)


TIMING_REPEATS = 20  # interleaved rounds of ``ByteLM.time_against``


class ByteLM(Experiment):
    """Runs of the tiny byte-level LM; a chapter sets ``name``, ``runs`` and ``seeds``."""

    setup_class = LMSetup
    eval_every = 100

    def base_moe(self) -> MoEConfig:
        s = self.setup
        return MoEConfig(d_model=s.d_model, d_hidden=s.d_hidden, num_experts=s.num_experts)

    def model_config(self, moe: MoEConfig) -> ModelConfig:
        s = self.setup
        return ModelConfig(BYTE_VOCAB_SIZE, s.block_size, n_layers=s.n_layers, n_heads=4, moe=moe)

    def data(self, seed: int):
        s = self.setup
        return lm_batches(corpus(), s.batch_size, s.block_size), held_out(s)

    def model(self, moe: MoEConfig, seed: int) -> TinyTransformer:
        """The seed's draw of the base model, copied into this run's wherever the shapes agree
        (a run's extra or reshaped parts keep their own draw)."""
        torch.manual_seed(seed)
        base = TinyTransformer(self.model_config(self.base_moe())).state_dict()
        torch.manual_seed(seed)
        model = TinyTransformer(self.model_config(moe))
        model.load_state_dict(self.initial_weights(base, model.state_dict()), strict=False)
        return model

    def initial_weights(self, base: dict[str, Tensor], own: dict[str, Tensor]) -> dict:
        """The tensors of the base draw a run's model takes: every one whose shape agrees (a
        chapter overrides this to map others, e.g. experts cut into pieces)."""
        return {k: v for k, v in base.items() if k in own and own[k].shape == v.shape}

    def time_against(self, model: nn.Module, reference: str) -> dict[str, dict]:
        """``model``'s training step and inference pass against a fresh model of run
        ``reference`` (the seed being trained, ``current``), on one training batch of the seed,
        interleaved over ``TIMING_REPEATS`` rounds: per kind the median ratio and its quartiles
        (to print with the number: timings on a shared machine are noisy, never asserted)."""
        seed = self.current[1]
        get_batch, _ = self.data(seed)
        batch = get_batch(torch.Generator().manual_seed(seed))
        ref = self.model(self.runs[reference].moe_config(self.base_moe()), seed)
        models = {"run": model, "ref": ref.to(self.setup.device)}
        times = {}
        for key, t in (
            ("step_ratio", time_train_steps(models, batch, repeats=TIMING_REPEATS)),
            ("inference_ratio", time_inference(models, batch)),
        ):
            ratios = t.ratios("run", "ref")
            q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            times[key] = {"median": q2, "quartiles": [q1, q3]}
        return times

    @torch.no_grad()
    def evaluate(self, model: nn.Module, held_out: list[Batch]) -> dict[str, float]:
        """Held-out loss (nats per byte), experts per token and MaxVio_global (the load over
        all held-out tokens, per layer, mean over layers)."""
        model.eval()
        device = next(model.parameters()).device
        losses, ept, load = [], [], None
        for batch in held_out:
            out = model(**{k: v.to(device) for k, v in batch.items()})
            losses.append(out.loss.item())
            ept.append(statistics.fmean(m.stats.experts_per_token.item() for m in out.layers))
            per_layer = torch.stack([m.stats.tokens_per_expert.float() for m in out.layers])
            load = per_layer if load is None else load + per_layer  # (layers, E)
        return {
            "loss": statistics.fmean(losses),
            "experts_per_token": statistics.fmean(ept),
            "maxvio_global": statistics.fmean(max_violation(row) for row in load),
        }


@torch.no_grad()
def time_inference(models: dict[str, nn.Module], batch: Batch) -> Timings:
    """Seconds of one evaluation forward pass per model on ``batch``'s inputs, interleaved."""
    device = next(next(iter(models.values())).parameters()).device
    idx = batch["idx"].to(device)
    for m in models.values():
        m.eval()
    return interleaved(
        {n: partial(m, idx=idx) for n, m in models.items()}, TIMING_REPEATS, device=device
    )

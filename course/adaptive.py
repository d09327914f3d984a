"""Chapter 5: adaptive gating against top-2 and its control, a threshold sweep, the curriculum
(``python -m course adaptive``), on the experiment harness (``course.harness``).

The data are the graded token tasks (``make_multitask``: copy < reverse < sort < add, the task
index is the difficulty), operands of 2 to ``max_len`` digits; ``n_train`` training samples per
seed in epochs (shuffled, or in the curriculum's order), and the same ``n_val`` held-out samples
for every seed. The model is a 2-layer TinyTransformer with 8 SwiGLU experts per layer; for one
seed every run starts from the same weights and (the curriculum aside) sees the same batches;
the learning rate decays (cosine) to zero, so a run ends where it stops improving.

Every batch carries its padding mask (about 37% of the positions are ``<pad>``): padding is
routed to no expert and counted in no loss, no routing statistic and no FLOP count. Every run
has its paper's losses (balance 1e-2 on top-1 decisions, no z-loss, no capacity limit) unless
its name says otherwise. Measured on the held-out samples every ``eval_every`` steps: the loss
on the answer positions, the share of tokens on two experts, experts per token and expert FLOPs
per token; at the end (``extra``) the share per layer, per task and per kind of position, the
share on the training batches over training, the curriculum's ranking time, and the training
step's time against a fresh top-2 model's (a median ratio with its quartiles: printed, never
asserted).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from course import harness, stats
from course.common import Timings, interleaved
from course.harness import Experiment, Run
from minimoe.analysis import RoutingRecorder
from minimoe.curriculum import CurriculumSampler
from minimoe.data import EOS_ID, PAD_ID, TASKS, VOCAB, Batch, MultiTaskData, make_multitask, seq_len
from minimoe.dispatch import combine
from minimoe.experts import Experts
from minimoe.layer import MoEConfig, moe_layers
from minimoe.model import ModelConfig, TinyTransformer, set_router
from minimoe.routing import Adaptive, TopK, top_k
from minimoe.train import History

ADAPTIVE = Adaptive(threshold=0.1)  # the chapter's router: the paper's threshold, raw gap
TOKEN_KINDS = ("prompt", "answer", "end")  # end: the <eos> input, nothing left to say
VAL_SEED = 1000  # the held-out samples, the same for every seed
WINDOW = 20  # steps per mean of the training-batch share (``extra``)
TIMING_REPEATS = 20

RUNS: dict[str, Run] = {
    "top-2": Run(TopK(k=2)),  # Mixtral: the two weights renormalized
    "top-2 raw": Run(TopK(k=2, renormalize=False)),  # adaptive gating's control: raw weights
    "adaptive 0.1": Run(ADAPTIVE),
    "adaptive 0.2": Run(Adaptive(threshold=0.2)),  # the paper's sweet spot is 0.1-0.2
    "adaptive 0.1 + curriculum": Run(ADAPTIVE),
    "adaptive 0.1 z=0.001": Run(ADAPTIVE, moe={"z_coef": 1e-3}),  # the course's router z-loss
}
CURRICULUM = ("adaptive 0.1 + curriculum",)  # trained on the curriculum's order
REFERENCE = "top-2"  # step times are relative to a fresh model of this run


@dataclass
class AdaptiveSetup:
    """The chapter's scale: 2 layers, d_model 64, 8 SwiGLU experts of width 128."""

    n_layers: int = 2
    d_model: int = 64
    d_hidden: int = 128
    num_experts: int = 8
    batch_size: int = 32
    steps: int = 1500
    lr: float = 5e-3
    lr_schedule: str = "cosine"
    n_train: int = 16384
    n_val: int = 512
    max_len: int = 4  # longest operand: sequences of seq_len(4) = 16 tokens
    seed: int = 0
    device: str = "cpu"


def make_data(setup: AdaptiveSetup, seed: int) -> tuple[MultiTaskData, MultiTaskData]:
    """The training samples of ``seed`` and the held-out samples (the same for every seed)."""
    return (
        make_multitask(setup.n_train, max_len=setup.max_len, seed=seed),
        make_multitask(setup.n_val, max_len=setup.max_len, seed=VAL_SEED),
    )


def as_batch(data: MultiTaskData) -> Batch:
    """The model's keyword arguments for ``data``: its padding mask beside the tokens."""
    return {"idx": data.inputs, "targets": data.targets, "mask": data.inputs != PAD_ID}


def token_kind(data: MultiTaskData) -> Tensor:
    """(N, L) index into TOKEN_KINDS: answer = scored positions ('=' and answer digits, which
    predict the answer), end = the <eos> input, prompt = the rest (task, operands, '+'); padding
    gets ``end`` too, but is never routed."""
    kind = torch.zeros_like(data.inputs)
    kind[data.answer_mask] = TOKEN_KINDS.index("answer")
    kind[(data.inputs == PAD_ID) | (data.inputs == EOS_ID)] = TOKEN_KINDS.index("end")
    return kind


@torch.no_grad()
def measure(model: nn.Module, val: MultiTaskData) -> dict[str, float]:
    """Held-out loss (answer positions), and over the real tokens (padding left out): the share
    on two experts and experts per token (means over layers), expert FLOPs per token (summed
    over layers)."""
    model.eval()
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in as_batch(val).items()})
    tokens = out.layers[0].routing.num_tokens  # real tokens only
    return {
        "loss": out.loss.item(),
        "two_expert_share": statistics.fmean(
            (m.routing.expert_counts > 1).float().mean().item() for m in out.layers
        ),
        "experts_per_token": statistics.fmean(m.stats.experts_per_token.item() for m in out.layers),
        "flops_per_token": sum(m.stats.flops.item() for m in out.layers) / tokens,
    }


@torch.no_grad()
def routing_report(model: nn.Module, val: MultiTaskData) -> dict:
    """Share of the held-out tokens (padding left out) on two experts: per layer, and per task
    and per kind of position (means over layers), by name."""
    real = val.inputs != PAD_ID  # (N, L)
    task = val.task[:, None].expand_as(val.inputs)[real]  # (T,) real tokens only
    kind = token_kind(val)[real]  # (T,)
    model.eval()
    device = next(model.parameters()).device
    with RoutingRecorder(model) as rec:
        model(idx=val.inputs.to(device), mask=real.to(device))
    two = torch.stack([rec.routing(i).expert_counts > 1 for i in range(len(rec))]).float()

    def share(groups: Tensor, names: Sequence[str]) -> dict[str, float]:
        return {
            n: two[:, groups == g].mean().item() for g, n in enumerate(names) if (groups == g).any()
        }

    return {
        "per_layer": two.mean(1).tolist(),
        "by_task": share(task, TASKS),
        "by_kind": share(kind, TOKEN_KINDS),
    }


def with_threshold(model: TinyTransformer, threshold: float) -> TinyTransformer:
    """A copy of an adaptive model that routes with another threshold (0: top-1, 1: top-2)."""
    router = moe_layers(model)[0].config.router
    return set_router(copy.deepcopy(model), replace(router, threshold=threshold))


class AdaptiveGating(Experiment):
    name = "adaptive"
    help = "chapter 5: adaptive gating vs top-2 and its control, thresholds, curriculum"
    setup_class = AdaptiveSetup
    runs = RUNS
    eval_every = 100

    def base_moe(self) -> MoEConfig:
        s = self.setup
        return MoEConfig(d_model=s.d_model, d_hidden=s.d_hidden, num_experts=s.num_experts)

    def declared(self) -> dict[str, dict]:
        """The runs as data, the curriculum's marked (its config is adaptive 0.1's)."""
        declared = super().declared()
        for name in CURRICULUM:
            declared[name]["curriculum"] = True
        return declared

    def data(self, seed: int) -> tuple[Batch, MultiTaskData]:
        train, val = make_data(self.setup, seed)
        return as_batch(train), val

    def batches(self, samples: Batch, model: nn.Module) -> CurriculumSampler:
        """Epochs of the training samples: shuffled by the trainer's generator, or for a
        curriculum run ranked with its model at the start of every epoch."""
        self.sampler = CurriculumSampler(
            model,
            samples,
            self.setup.batch_size,
            curriculum=self.current[0] in CURRICULUM,
            valid=samples["mask"],
        )
        return self.sampler

    def model(self, moe: MoEConfig, seed: int) -> TinyTransformer:
        s = self.setup
        torch.manual_seed(seed)
        config = ModelConfig(
            len(VOCAB), seq_len(s.max_len), n_layers=s.n_layers, n_heads=4, moe=moe
        )
        return TinyTransformer(config)

    def evaluate(self, model: nn.Module, held_out: MultiTaskData) -> dict[str, float]:
        return measure(model, held_out)

    def extra(self, model: nn.Module, held_out: MultiTaskData, history: History, record) -> dict:
        """The routing report; the training batches' share on two experts (experts per token
        - 1, real tokens, mean over layers) in means of ``WINDOW`` steps; for a curriculum run
        its ranking seconds and epochs; for a run trained to the end its training step's time
        against a fresh top-2 model's (interleaved: the median ratio and its quartiles)."""
        name, seed = self.current
        per_step = [statistics.fmean(layers) - 1 for layers in history.experts_per_token]
        extra = routing_report(model, held_out) | {
            "train_two_share": [
                statistics.fmean(per_step[i : i + WINDOW]) for i in range(0, len(per_step), WINDOW)
            ],
        }
        if name in CURRICULUM:
            extra |= {
                "ranking_seconds": self.sampler.ranking_seconds,
                "epochs": self.sampler.epochs,
            }
        if len(history.loss) == self.setup.steps:
            extra["step_ratio"] = self.step_ratio(model, seed)
        return extra

    def step_ratio(self, model: nn.Module, seed: int) -> dict:
        """``model``'s training step against a fresh top-2 model's on one training batch of the
        seed: the median ratio over interleaved rounds and its quartiles (to print, with the
        number: timings on a shared machine are noisy)."""
        samples, _ = self.data(seed)
        batch = {k: v[: self.setup.batch_size] for k, v in samples.items()}
        ref = self.model(self.runs[REFERENCE].moe_config(self.base_moe()), seed)
        models = {"run": model, "ref": ref.to(self.setup.device)}
        ratios = time_train_steps(models, batch, TIMING_REPEATS).ratios("run", "ref")
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        return {"median": q2, "quartiles": [q1, q3]}


def load(path=None) -> harness.Results:
    """The cached results (``data/adaptive``), checked against the declared runs."""
    return harness.load(AdaptiveGating(), path)


def add_parser(sub) -> None:
    AdaptiveGating().add_parser(sub)


# ---- the chapter's family of comparisons -----------------------------------------------------

# (a, b, measure) on the whole runs: six on the held-out loss, one on the share on two experts
FAMILY = [
    ("top-2 raw", "top-2", "loss"),
    ("adaptive 0.1", "top-2", "loss"),
    ("adaptive 0.1", "top-2 raw", "loss"),
    ("adaptive 0.2", "top-2 raw", "loss"),
    ("adaptive 0.1 + curriculum", "adaptive 0.1", "loss"),
    ("adaptive 0.1 z=0.001", "adaptive 0.1", "loss"),
    ("adaptive 0.1 z=0.001", "adaptive 0.1", "two_expert_share"),
]
TESTBED_PAIRS = [("adaptive 0.1", "top-2 raw"), ("adaptive 0.1", "top-1")]  # on rel_error


def by_position(results: harness.Results) -> dict[str, stats.Comparison]:
    """Adaptive 0.1's share on two experts at the end of the whole runs, paired by seed
    (uncorrected): answer against prompt positions, and add against the mean of the other tasks."""
    reports = [results.record("adaptive 0.1", s)["extra"] for s in results.seeds]
    kind = {k: [r["by_kind"][k] for r in reports] for k in ("answer", "prompt")}
    others = [statistics.fmean(v for t, v in r["by_task"].items() if t != "add") for r in reports]
    share = {"measure": "two-expert share", "lower_is_better": None}
    return {
        "answer vs prompt": stats.compare(
            kind["answer"], kind["prompt"], ("answer positions", "prompt positions"), **share
        ),
        "add vs the other tasks": stats.compare(
            [r["by_task"]["add"] for r in reports], others, ("add", "the other tasks"), **share
        ),
    }


def family(
    results: harness.Results, testbeds: dict[str, harness.Results]
) -> dict[tuple[str, ...] | str, stats.Comparison]:
    """The chapter's comparisons, uncorrected: ``FAMILY`` on the whole runs (keyed by their
    triple), ``by_position`` (by name) and adaptive gating against its control and top-1 on each
    testbed (keyed ``(mixing, a, b)``). Chapter 5 and its deeper part (5b) both correct the whole
    family together (``stats.holm``), so a verdict reads the same in either."""
    out: dict[tuple[str, ...] | str, stats.Comparison] = {
        (a, b, m): results.compare(a, b, m, lower_is_better=True if m == "loss" else None)
        for a, b, m in FAMILY
    }
    out |= by_position(results)
    for mixing, tb in testbeds.items():
        out |= {(mixing, a, b): tb.compare(a, b, "rel_error") for a, b in TESTBED_PAIRS}
    return out


# ---- time against FLOPs ---------------------------------------------------------------------


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

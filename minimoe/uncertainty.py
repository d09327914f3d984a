"""How sure is the router? Uncertainty of recorded routing, and GW-MoE fine-tuning.

GW-MoE (Wu et al. 2024) claims that tokens whose router probabilities are near uniform
("uncertain") pick the wrong expert more often. This file measures that on any model with
MoE layers, without touching the model's code:

- per token and layer: entropy H(P), normalized entropy H / ln E, top-1/top-2 gap;
- the share of uncertain tokens at a threshold, per layer;
- flips: does a token's first choice (or its whole top-k set) change under a small
  perturbation of the layer's input or of the router weights?
- wrong expert: on the toy task, does the first choice differ from the expert that serves
  the token's cluster?

and it holds the GW fine-tuning recipe (``GWFineTuning``): which switches of the MoE layer
and of the trainer the official code turns, applied to a pretrained model in one call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from minimoe.analysis import RoutingRecorder, first_choice
from minimoe.checks import check_bool, check_float
from minimoe.data import Batch
from minimoe.layer import moe_layers
from minimoe.model import set_router
from minimoe.routing import (
    GWBroadcast,
    Router,
    Routing,
    check_int,
    check_threshold,
    entropy,
    normalized_entropy,
    top_expert,
    top_gap,
)
from minimoe.routing import is_uncertain as routing_is_uncertain

# ---- per-token measures ---------------------------------------------------------------


def is_uncertain(routing: Routing, threshold: float, measure: str = "normalized_entropy") -> Tensor:
    """(T,) bool: the tokens ``gw_broadcast`` would broadcast (``routing.is_uncertain``)."""
    return routing_is_uncertain(routing.probs, threshold, measure)


def uncertain_share(
    routing: Routing, threshold: float, measure: str = "normalized_entropy"
) -> float:
    """Share of tokens whose uncertainty is >= threshold (0 for no tokens)."""
    flags = is_uncertain(routing, threshold, measure)
    return flags.float().mean().item() if flags.numel() else 0.0


def uncertain_share_per_layer(
    routings: Sequence[Routing], threshold: float, measure: str = "normalized_entropy"
) -> list[float]:
    """``uncertain_share`` of each layer's routing, bottom layer first."""
    return [uncertain_share(r, threshold, measure) for r in routings]


def layer_summary(
    routings: Sequence[Routing], threshold: float, measure: str = "normalized_entropy"
) -> list[dict[str, float]]:
    """Per layer: mean entropy (nats), normalized entropy and top-1/top-2 gap, and the share
    of uncertain tokens. Per-token values: ``analysis.uncertainty_summary`` and ``entropy``."""
    return [
        {
            "entropy": entropy(r.probs).mean().item(),
            "normalized_entropy": normalized_entropy(r.probs).mean().item(),
            "top_gap": top_gap(r.probs).mean().item(),
            "uncertain_share": uncertain_share(r, threshold, measure),
        }
        for r in routings
    ]


def uncertain_in_any_layer(
    routings: Sequence[Routing], threshold: float, measure: str = "normalized_entropy"
) -> Tensor:
    """(T,) bool: the token is uncertain in at least one layer (it would be broadcast there)."""
    flags = torch.stack([is_uncertain(r, threshold, measure) for r in routings])  # (layers, T)
    return flags.any(dim=0)


# ---- recording and perturbing a model -------------------------------------------------


@torch.no_grad()
def record_routing(model: nn.Module, batch: Batch) -> tuple[object, list[Routing]]:
    """Run ``model(**batch)`` in eval mode, the batch moved to the model's device; return its
    output and each MoE layer's Routing (on the CPU, as the recorder keeps it).

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with RoutingRecorder(model) as rec:
            out = model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        model.train(was_training)
    return out, [rec.routing(i) for i in range(len(rec))]


def _rms(t: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return t.pow(2).mean().sqrt()
    return t.pow(2).mean(dim=dim, keepdim=True).sqrt()


@contextmanager
def perturbed_router(model: nn.Module, scale: float, generator: torch.Generator) -> Iterator[None]:
    """Inside the block every router W_r gets Gaussian noise of std ``scale * rms(W_r)``."""
    saved = []
    with torch.no_grad():
        for layer in moe_layers(model) if scale else []:
            w = layer.gate.weight
            saved.append((w, w.detach().clone()))
            w.add_(scale * _rms(w) * torch.randn(w.shape, generator=generator).to(w.device))
    try:
        yield
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)


@contextmanager
def perturbed_inputs(model: nn.Module, scale: float, generator: torch.Generator) -> Iterator[None]:
    """Inside the block each MoE layer sees x + eps, eps ~ N(0, (scale * rms(x_token))^2).

    The noise is relative to each token's own size, so every token is shaken alike.
    """

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        noise = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
        return (x + scale * _rms(x, dim=-1) * noise,) + args[1:]

    handles = [m.register_forward_pre_hook(hook) for m in moe_layers(model)] if scale else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


COMPARE = ("set", "first")


def changed(before: Routing, after: Routing, compare: str = "first") -> Tensor:
    """(T,) bool: the token's chosen experts differ (``first``: the top-1; ``set``: the set S).

    With top-2 a confident token's second choice is a near-tie among experts it barely uses,
    so ``set`` flips often even for certain tokens; ``first`` is the choice that matters.
    """
    if compare not in COMPARE:
        raise ValueError(f"compare must be one of {COMPARE}, got compare={compare!r}")
    if compare == "first":
        return first_choice(before) != first_choice(after)
    return (before.mask != after.mask).any(dim=1)


def flip_rate(
    model: nn.Module,
    batch: Batch,
    *,
    input_noise: float = 0.0,
    router_noise: float = 0.0,
    draws: int = 8,
    seed: int = 0,
    compare: str = "first",
) -> list[Tensor]:
    """Per layer, (T,) share of ``draws`` perturbed passes in which a token's choice changed.

    Perturbations (both relative, see ``perturbed_inputs`` and ``perturbed_router``) are
    drawn from a generator seeded with ``seed``; the unperturbed pass is the reference.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got draws={draws}")
    _, base = record_routing(model, batch)
    counts = [torch.zeros(r.num_tokens) for r in base]
    g = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        with ExitStack() as stack:
            stack.enter_context(perturbed_router(model, router_noise, g))
            stack.enter_context(perturbed_inputs(model, input_noise, g))
            _, routings = record_routing(model, batch)
        for c, b, r in zip(counts, base, routings, strict=True):
            c += changed(b, r, compare).float()
    return [c / draws for c in counts]


# ---- wrong expert (toy task) and rates by uncertainty ---------------------------------


def wrong_expert(routing: Routing, cluster: Tensor, right_expert: Tensor) -> Tensor:
    """(T,) bool: the first choice is not the expert that serves the token's cluster.

    ``right_expert`` (C,) maps cluster -> expert, e.g. ``analysis.expert_for_cluster``.
    """
    return first_choice(routing) != right_expert[cluster]


def rates_by_uncertainty(event: Tensor, uncertain: Tensor) -> dict[str, float]:
    """Mean of ``event`` (T,) (bool or in [0, 1]) over uncertain and over certain tokens.

    A group without tokens gets NaN, so a comparison with it is never silently true.
    """
    event = event.float()

    def mean(sel: Tensor) -> float:
        return event[sel].mean().item() if sel.any() else float("nan")

    return {
        "uncertain": mean(uncertain),
        "certain": mean(~uncertain),
        "uncertain_share": uncertain.float().mean().item() if uncertain.numel() else 0.0,
    }


def binned_rate(score: Tensor, event: Tensor, num_bins: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """Split tokens into ``num_bins`` equal-count bins of ``score`` (ascending); per bin the
    mean score, the mean of ``event`` and the number of tokens: three (num_bins,) tensors."""
    if num_bins < 1 or score.numel() < num_bins:
        raise ValueError(f"need at least num_bins={num_bins} >= 1 tokens, got {score.numel()}")
    order = score.argsort(stable=True)
    bins = [order[chunk] for chunk in torch.arange(score.numel()).tensor_split(num_bins)]
    mean_score = torch.stack([score[b].float().mean() for b in bins])
    rate = torch.stack([event[b].float().mean() for b in bins])
    return mean_score, rate, torch.tensor([len(b) for b in bins])


# ---- sensitivity to the choice (what GW fine-tuning claims to reduce) -------------------


def swap_first_choice(routing: Routing) -> Routing:
    """Each token's first choice replaced by its best unchosen expert: the wrong pick an
    uncertain router would make. Tokens sent to every expert, or to none (expert choice),
    keep their routing.

    The new set is weighted by the probabilities, scaled to the old weights' total (1 for a
    renormalizing top-k), so only the choice changes, not how much the layer adds.
    """
    first = top_expert(routing.probs.masked_fill(~routing.mask, -1.0))  # (T,) best chosen
    best_unchosen = top_expert(routing.probs.masked_fill(routing.mask, -1.0))  # (T,)
    can = routing.mask.any(1) & ~routing.mask.all(1)  # (T,) something to swap out and in
    rows = torch.arange(routing.mask.shape[0], device=routing.mask.device)[can]
    mask = routing.mask.clone()
    mask[rows, first[can]] = False
    mask[rows, best_unchosen[can]] = True
    new = routing.probs * mask  # (T, E)
    total = routing.weights.sum(1, keepdim=True)  # (T, 1)
    weights = new * (total / new.sum(1, keepdim=True).clamp_min(torch.finfo(new.dtype).tiny))
    return Routing(logits=routing.logits, probs=routing.probs, mask=mask, weights=weights)


@dataclass(frozen=True)
class SwappedFirstChoice:
    """A router that routes as ``base`` does, then swaps each token's first choice."""

    base: Router

    def __call__(
        self, logits: Tensor, *, training: bool, seq_len: int | None = None, **kw
    ) -> Routing:
        return swap_first_choice(self.base(logits, training=training, seq_len=seq_len, **kw))


@contextmanager
def swapped_first_choice(model: nn.Module) -> Iterator[None]:
    """Inside the block, every MoE layer of ``model`` routes each token to its best unchosen
    expert instead of its first choice; the configs (and router state) are restored after.

    GW-MoE's claim, measured directly: after GW fine-tuning, the loss of an uncertain token
    should change less when its choice changes (compare the loss inside and outside).
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer")
    configs = [layer.config for layer in layers]
    try:
        for layer, config in zip(layers, configs, strict=True):
            layer.config = replace(config, router=SwappedFirstChoice(config.router))
        yield
    finally:
        for layer, config in zip(layers, configs, strict=True):
            layer.config = config


# ---- GW fine-tuning -------------------------------------------------------------------


@dataclass(frozen=True)
class GWFineTuning:
    """A fine-tuning recipe: GW broadcast in the MoE layers plus the official code's switches.

    ``threshold=None`` is plain fine-tuning with the same switches, so a comparison changes
    one thing only; ``threshold=0`` broadcasts every token (the "all tokens" ablation).
    The released code freezes the router, turns the router z-loss off and keeps the balance
    loss at 1e-3; all three are settings here (``balance_coef=None`` keeps the layer's).
    ``freeze_router`` is read by the trainer (``TrainConfig.freeze_router``).
    """

    threshold: float | None = None
    measure: str = "normalized_entropy"
    max_slots: int | None = None  # broadcast tokens per sequence, first tokens first
    freeze_router: bool = True
    z_loss: bool = False
    balance_coef: float | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None:
            check_threshold(self.threshold, self.measure, None)
        else:
            check_threshold(0.0, self.measure, None)  # the measure is checked either way
        if self.max_slots is not None:
            check_int("max_slots", self.max_slots, 0)
        check_bool("freeze_router", self.freeze_router)
        check_bool("z_loss", self.z_loss)
        if self.balance_coef is not None:
            check_float("balance_coef", self.balance_coef, 0.0)

    def apply(self, model: nn.Module) -> nn.Module:
        """Give every MoE layer a new config with GW broadcast around its base router (the z-loss
        off unless kept, the balance coefficient if given); returns the model. Layers are never
        edited in place."""
        base = moe_layers(model)[0].config.router
        base = base.base if isinstance(base, GWBroadcast) else base
        router = (
            base
            if self.threshold is None
            else GWBroadcast(
                base, threshold=self.threshold, measure=self.measure, max_slots=self.max_slots
            )
        )
        changes = {} if self.z_loss else {"z_coef": 0.0}
        if self.balance_coef is not None:
            changes["balance_coef"] = self.balance_coef
        return set_router(model, router, **changes)

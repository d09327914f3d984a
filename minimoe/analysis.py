"""Recorded routing -> statistics, without touching the model's code.

``RoutingRecorder`` hooks every MoE layer of a model and keeps its Routing (on the CPU,
detached) for each forward pass inside the ``with`` block:

    with RoutingRecorder(model) as rec:
        model(idx)
    layer0 = rec.routing(0)            # one Routing over all recorded tokens
    experts_per_token(layer0)          # statistics are plain functions of a Routing
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minimoe.dispatch import apply_capacity, expert_capacity
from minimoe.layer import MoE, MoEOutput
from minimoe.routing import Routing, is_uncertain, normalized_entropy, top_gap, top_k


def _cpu(routing: Routing) -> Routing:
    fields = {k: (None if v is None else v.detach().cpu()) for k, v in vars(routing).items()}
    return Routing(**fields)


def concat_routing(parts: list[Routing]) -> Routing:
    """Stack several decisions over the same experts into one, token after token."""
    if not parts:
        raise ValueError("no routing was recorded: run the model inside the recorder first")
    cat = {name: torch.cat([getattr(r, name) for r in parts]) for name in ("logits", "probs", "mask", "weights")}
    if any(r.broadcast is not None for r in parts):
        cat["broadcast"] = torch.cat([
            r.broadcast if r.broadcast is not None else torch.zeros(r.num_tokens, dtype=torch.bool)
            for r in parts
        ])
    return Routing(**cat)


class RoutingRecorder:
    """Collect each MoE layer's routing during forward passes (a context manager)."""

    def __init__(self, model: nn.Module):
        self.layers: list[MoE] = [m for m in model.modules() if isinstance(m, MoE)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no MoE layer to record")
        self.records: list[list[Routing]] = [[] for _ in self.layers]
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple, output: MoEOutput) -> None:
            self.records[i].append(_cpu(output.routing))
        return hook

    def routing(self, layer: int) -> Routing:
        """All tokens recorded at MoE layer ``layer`` (0 = lowest), as one Routing."""
        return concat_routing(self.records[layer])

    def __len__(self) -> int:
        return len(self.layers)


# ---- statistics of a Routing -----------------------------------------------------------


def experts_per_token(routing: Routing) -> float:
    """Mean number of experts a token is sent to."""
    return routing.mask.sum(1).float().mean().item() if routing.num_tokens else 0.0


def load_per_expert(routing: Routing) -> Tensor:
    """(E,) share of all (token, expert) assignments that each expert receives (sums to 1)."""
    counts = routing.mask.sum(0).float()
    return counts / counts.sum().clamp_min(1)


def load_imbalance(routing: Routing) -> float:
    """max load / mean load: 1 when balanced, E when one expert takes everything."""
    load = load_per_expert(routing)
    return (load.max() / load.mean()).item() if load.sum() > 0 else 0.0


def first_choice(routing: Routing) -> Tensor:
    """(T,) the expert with the largest router probability."""
    return routing.probs.argmax(dim=1)


@dataclass
class UncertaintySummary:
    normalized_entropy: Tensor  # (T,)
    top_gap: Tensor  # (T,)
    uncertain: Tensor  # (T,) bool, normalized entropy >= threshold

    @property
    def uncertain_share(self) -> float:
        return self.uncertain.float().mean().item() if self.uncertain.numel() else 0.0


def uncertainty_summary(routing: Routing, threshold: float = 0.5) -> UncertaintySummary:
    """Per-token normalized entropy, top-1/top-2 gap, and which tokens are uncertain."""
    h = normalized_entropy(routing.probs)
    return UncertaintySummary(h, top_gap(routing.probs), is_uncertain(routing.probs, threshold))


def expert_for_cluster(routing: Routing, cluster: Tensor, num_clusters: int | None = None) -> Tensor:
    """(C,) the expert that serves most of each cluster's first choices: its 'right' expert."""
    num_clusters = num_clusters or int(cluster.max()) + 1
    first = first_choice(routing)
    counts = torch.zeros(num_clusters, routing.num_experts, dtype=torch.long)
    counts.index_put_((cluster, first), torch.ones_like(first), accumulate=True)  # (C, E)
    return counts.argmax(dim=1)


def experts_per_token_by_group(routing: Routing, groups: Tensor) -> dict[int, float]:
    """Mean experts per token for each group label (e.g. task or difficulty), groups (T,)."""
    ept = routing.mask.sum(1).float()
    return {int(g): ept[groups == g].mean().item() for g in groups.unique()}


@dataclass
class CapacityReport:
    capacity: int | None  # slots per expert (None: dropless)
    tokens_per_expert: Tensor  # (E,) pairs routed to each expert
    kept_per_expert: Tensor  # (E,) pairs that found a slot
    dropped_pairs: int  # (token, expert) pairs over capacity
    dropped_tokens: int  # tokens that lost every expert


def capacity_report(logits: Tensor, k: int, capacity_factor: float | None) -> CapacityReport:
    """What top-k routing with a capacity factor does to these logits (T, E)."""
    routing = top_k(logits, k)
    cap = expert_capacity(int(routing.mask.sum()), routing.num_experts, capacity_factor)
    kept = apply_capacity(routing.mask, routing.probs, cap)
    return CapacityReport(
        capacity=cap,
        tokens_per_expert=routing.mask.sum(0),
        kept_per_expert=kept.sum(0),
        dropped_pairs=int((routing.mask & ~kept).sum()),
        dropped_tokens=int((routing.mask.any(1) & ~kept.any(1)).sum()),
    )


class ExpertsPerTokenTracker:
    """Training callback: every ``every`` steps, run a fixed probe batch in eval mode and
    record mean experts per token per MoE layer, and per group label if ``groups`` is given
    (one label per token of the probe batch, flattened like the model's tokens).

        tracker = ExpertsPerTokenTracker(probe, every=25, groups=task_per_token)
        train(model, get_batch, config, callback=tracker)
        tracker.steps, tracker.per_layer, tracker.per_group
    """

    def __init__(self, probe: dict[str, Tensor], every: int = 25, groups: Tensor | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got every={every}")
        self.probe, self.every, self.groups = probe, every, groups
        self.steps: list[int] = []
        self.per_layer: list[list[float]] = []  # [record][layer]
        self.per_group: list[list[dict[int, float]]] = []  # [record][layer] {group: ept}

    @torch.no_grad()
    def __call__(self, step: int, model: nn.Module, output: object = None) -> None:
        if step % self.every:
            return
        was_training = model.training
        model.eval()
        with RoutingRecorder(model) as rec:
            model(**self.probe)
        model.train(was_training)
        layers = [rec.routing(i) for i in range(len(rec))]
        self.steps.append(step)
        self.per_layer.append([experts_per_token(r) for r in layers])
        if self.groups is not None:
            self.per_group.append([experts_per_token_by_group(r, self.groups) for r in layers])

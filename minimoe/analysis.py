"""Recorded routing -> statistics, without touching the model's code.

``RoutingRecorder`` hooks every MoE layer of a model and keeps its Routing (on the CPU,
detached) for each forward pass inside the ``with`` block:

    with RoutingRecorder(model) as rec:
        model(idx)
    layer0 = rec.routing(0)            # one Routing over all recorded tokens
    experts_per_token(layer0)          # statistics are plain functions of a Routing

Load balance as Wang et al. (2024, auxiliary-loss-free balancing) measure it, MaxVio =
(max_i load_i - mean load) / mean load (``max_violation``): MaxVio_batch per training step is
``History.max_violation`` ([step][layer], from each layer's ``MoEStats.tokens_per_expert``),
MaxVio_global is ``max_violation(rec.routing(i))`` with the recorder run over a validation set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minimoe.dispatch import apply_capacity, expert_capacity
from minimoe.layer import MoE, MoEOutput, moe_layers
from minimoe.routing import Routing, is_uncertain, normalized_entropy, top_expert, top_gap, top_k


class RoutingRecorder:
    """Collect each MoE layer's routing during forward passes (a context manager).

    One recorder can be entered again after its ``with`` block: new passes are appended to the
    records. Entering it while it is recording raises RuntimeError (each pass would count twice).
    """

    def __init__(self, model: nn.Module):
        self.layers: list[MoE] = moe_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no MoE layer to record")
        self.records: list[list[Routing]] = [[] for _ in self.layers]
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        if self._handles:
            raise RuntimeError(
                "this RoutingRecorder is already recording: leave its with block "
                "first (entering it twice would record every pass twice)"
            )
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple, output: MoEOutput) -> None:
            self.records[i].append(output.routing.to("cpu"))

        return hook

    def routing(self, layer: int) -> Routing:
        """All tokens recorded at MoE layer ``layer`` (0 = lowest; -1 = the top), as one Routing."""
        n = len(self.layers)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise IndexError(
                f"layer must be an int in [{-n}, {n - 1}]: the model has {n} MoE layers, got layer={layer!r}"
            )
        return Routing.cat(self.records[layer])

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


def max_violation(load: Tensor | Routing) -> float:
    """MaxVio (Wang et al. 2024): (max_i load_i - mean load) / mean load; 0 when balanced.

    ``load``: (E,) tokens per expert, or a Routing (its ``tokens_per_expert``).
    """
    if isinstance(load, Routing):
        load = load.tokens_per_expert
    if not isinstance(load, Tensor):
        raise TypeError(f"load must be a Tensor or a Routing, got {type(load).__name__}")
    if load.dim() != 1 or not load.numel():
        raise ValueError(f"load must be a non-empty (E,) tensor, got shape {tuple(load.shape)}")
    load = load.double()
    mean = load.mean()
    if not mean > 0:
        raise ValueError(f"load has no tokens (mean load {mean.item()}): MaxVio is undefined")
    # MaxVio = (max_i load_i - mean load) / mean load
    return ((load.max() - mean) / mean).item()


def expert_count_shares(routing: Routing) -> dict[int, float]:
    """Share of tokens sent to 0, 1, 2, ... experts (every count up to the largest; sums to 1).

    Expert choice leaves some tokens with no expert and gives others several; top-k gives {k: 1}
    plus zeros below k.
    """
    if not routing.num_tokens:
        return {}
    counts = torch.bincount(routing.expert_counts.long())  # (max count + 1,)
    return dict(enumerate((counts.double() / routing.num_tokens).tolist()))


def load_imbalance(routing: Routing) -> float:
    """max load / mean load: 1 when balanced, E when one expert takes everything."""
    load = load_per_expert(routing)
    return (load.max() / load.mean()).item() if load.sum() > 0 else 0.0


def first_choice(routing: Routing) -> Tensor:
    """(T,) the expert with the largest router probability (ties: the lowest index, as routing)."""
    return top_expert(routing.probs)


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


def expert_for_cluster(
    routing: Routing, cluster: Tensor, num_clusters: int | None = None
) -> Tensor:
    """(C,) the expert that serves most of each cluster's first choices: its 'right' expert.

    ``cluster`` (T,) integer labels in [0, num_clusters) (default: max label + 1). A tie goes to
    the lower expert index; a cluster without tokens gets expert 0.
    """
    if not isinstance(cluster, Tensor):
        raise TypeError(f"cluster must be a Tensor of labels, got {type(cluster).__name__}")
    if cluster.is_floating_point() or cluster.is_complex() or cluster.dtype == torch.bool:
        raise TypeError(f"cluster must hold integer labels, got dtype {cluster.dtype}")
    if cluster.shape != (routing.num_tokens,):
        raise ValueError(
            f"cluster must have shape ({routing.num_tokens},), a label per routed "
            f"token, got {tuple(cluster.shape)}"
        )
    if num_clusters is None:
        if not cluster.numel():
            raise ValueError("cluster is empty: pass num_clusters")
        num_clusters = int(cluster.max()) + 1
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int):
        raise TypeError(f"num_clusters must be an int, got num_clusters={num_clusters!r}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got num_clusters={num_clusters}")
    bad = cluster[(cluster < 0) | (cluster >= num_clusters)]
    if bad.numel():
        raise ValueError(f"cluster labels must be in [0, {num_clusters}), got {bad[0].item()}")
    cluster = cluster.long().to(routing.probs.device)
    first = first_choice(routing)
    counts = torch.zeros(num_clusters, routing.num_experts, dtype=torch.long, device=first.device)
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

"""The MoE layer: router -> routing function -> capacity -> dispatch/experts/combine.

Follow one token: ``MoE.forward`` computes its router logits (float32), ``route`` turns
them into a Routing (minimoe/routing.py), ``apply_capacity`` drops pairs over an expert's
capacity (minimoe/dispatch.py), ``combine`` runs the experts (minimoe/experts.py) and adds
their outputs with the combine weights. The layer returns the output beside the routing,
the auxiliary losses and the statistics: nothing is stored on the module, so re-running a
cell never double-counts a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimoe.dispatch import DISPATCH_PATHS, apply_capacity, combine, expert_capacity
from minimoe.experts import ACTIVATIONS, Experts
from minimoe.losses import dynamic_loss, load_balance_loss, z_loss
from minimoe.routing import (
    ROUTERS,
    UNCERTAINTY,
    Routing,
    adaptive,
    gw_broadcast,
    noisy_top_k,
    top_k,
    top_p,
)


@dataclass
class MoEConfig:
    """Everything one MoE layer needs. Defaults: Mixtral-style top-2 over 8 SwiGLU experts."""

    d_model: int = 64
    d_hidden: int = 128  # width of each expert
    num_experts: int = 8
    router: str = "top_k"  # top_k | noisy_top_k | top_p | adaptive
    k: int = 2  # top_k, noisy_top_k
    renormalize: bool = True  # top_k: Mixtral renormalizes over S; Switch (k=1) does not
    top_p: float = 0.4  # top_p threshold on the cumulative probability
    top_p_rule: str = "paper"  # "paper" (cumsum >= p) | "code" (official release: > p)
    max_experts: int | None = None  # top_p: optional cap on experts per token
    adaptive_threshold: float = 0.1  # adaptive: two experts when the top-1/top-2 gap <= this
    adaptive_gap: str = "raw"  # adaptive: "raw" p1 - p2 | "normalized" (p1 - p2) / (p1 + p2)
    gw_threshold: float | None = None  # GW-MoE: broadcast uncertain tokens in training
    gw_measure: str = "normalized_entropy"  # or "entropy" (nats), as the released code
    gw_max_slots: int | None = None  # GW-MoE: at most this many broadcast tokens per sequence
    capacity_factor: float | None = None  # None = dropless
    dispatch: str = "sorted"  # "sorted" (sort-gather-scatter) | "loop" (reference)
    activation: str = "swiglu"  # "swiglu" | "gelu"
    balance_coef: float = 1e-2  # alpha of the load-balance loss
    balance_count: str = "auto"  # "first" (Switch) | "selected" (Top-P) | "auto": selected for top_p
    z_coef: float = 1e-3  # ST-MoE router z-loss
    dynamic_coef: float | None = None  # beta of the Top-P dynamic (entropy) loss; None: 1e-4 for top_p (the paper), 0 otherwise

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; choose from {sorted(ROUTERS)}")
        if self.dispatch not in DISPATCH_PATHS:
            raise ValueError(f"unknown dispatch path {self.dispatch!r}; choose from {DISPATCH_PATHS}")
        if self.router in ("top_k", "noisy_top_k") and not 1 <= self.k <= self.num_experts:
            raise ValueError(f"k must be in [1, num_experts={self.num_experts}], got k={self.k}")
        if self.balance_count not in ("auto", "first", "selected"):
            raise ValueError(f"balance_count must be auto, first or selected, got {self.balance_count!r}")
        if self.dynamic_coef is not None and not self.dynamic_coef >= 0:
            raise ValueError(f"dynamic_coef must be >= 0 or None, got dynamic_coef={self.dynamic_coef!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown expert activation {self.activation!r}; choose from {ACTIVATIONS}")
        if self.top_p_rule not in ("paper", "code"):
            raise ValueError(f"top_p_rule must be 'paper' or 'code', got {self.top_p_rule!r}")
        if self.adaptive_gap not in ("raw", "normalized"):
            raise ValueError(f"adaptive_gap must be 'raw' or 'normalized', got {self.adaptive_gap!r}")
        if self.gw_measure not in UNCERTAINTY:
            raise ValueError(f"unknown gw_measure {self.gw_measure!r}; choose from {sorted(UNCERTAINTY)}")
        expert_capacity(1, 1, self.capacity_factor)  # validates capacity_factor

    @property
    def balance_counts(self) -> str:
        if self.balance_count != "auto":
            return self.balance_count
        return "selected" if self.router == "top_p" else "first"

    @property
    def dynamic_beta(self) -> float:
        """beta of L_d: ``dynamic_coef``, or by default the Top-P paper's 1e-4 for top_p and 0 otherwise."""
        if self.dynamic_coef is not None:
            return self.dynamic_coef
        return 1e-4 if self.router == "top_p" else 0.0


class MoEStats(NamedTuple):
    """Routing statistics of one forward pass (detached tensors; .item() when printing)."""

    experts_per_token: Tensor  # () mean number of experts a token is sent to
    tokens_per_expert: Tensor  # (E,) tokens routed to each expert, before capacity
    dropped_pairs: Tensor  # () (token, expert) pairs over capacity
    dropped_tokens: Tensor  # () tokens that lost every expert (carried by the residual only)
    broadcast_ratio: Tensor  # () share of tokens GW-broadcast to all experts (the code's gw_ratio)
    flops: Tensor  # () expert FLOPs of this pass (matmuls, kept pairs)


class MoEOutput(NamedTuple):
    output: Tensor  # (..., d_model), the input's shape
    routing: Routing  # over the flattened tokens (T, E)
    aux_loss: Tensor  # () weighted sum of the auxiliary losses: add it to the task loss
    losses: dict[str, Tensor]  # unweighted: load_balance, z_loss, dynamic
    stats: MoEStats


def route(config: MoEConfig, logits: Tensor, noise_logits: Tensor | None, training: bool) -> Routing:
    """The routing function named by ``config.router`` (add a new router here and in ROUTERS)."""
    c = config
    if c.router == "top_k":
        return top_k(logits, c.k, renormalize=c.renormalize)
    if c.router == "noisy_top_k":
        return noisy_top_k(logits, noise_logits, c.k, training=training)
    if c.router == "top_p":
        return top_p(logits, c.top_p, rule=c.top_p_rule, max_experts=c.max_experts)
    return adaptive(logits, c.adaptive_threshold, gap=c.adaptive_gap)


class MoE(nn.Module):
    """A sparse Mixture-of-Experts FFN over inputs of shape (..., d_model)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        E, d = config.num_experts, config.d_model
        self.gate = nn.Linear(d, E, bias=False)  # the router W_r, kept in float32
        self.noise = nn.Linear(d, E, bias=False) if config.router == "noisy_top_k" else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)  # start with softplus(0) = 0.69 noise scale
        self.experts = Experts(
            num_experts=E, d_model=d, d_hidden=config.d_hidden, activation=config.activation
        )

    def router_logits(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """(T, d) -> (T, E) float32 logits (and the noise logits of noisy top-k)."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            x = tokens.float()
            logits = F.linear(x, self.gate.weight.float())
            noise = F.linear(x, self.noise.weight.float()) if self.noise is not None else None
        return logits, noise

    def forward(self, x: Tensor) -> MoEOutput:
        c = self.config
        if x.dim() < 1 or x.shape[-1] != c.d_model:
            raise ValueError(f"MoE expects inputs of shape (..., d_model={c.d_model}), got {tuple(x.shape)}")
        tokens = x.reshape(-1, c.d_model)  # (T, d)
        logits, noise_logits = self.router_logits(tokens)
        routing = route(c, logits, noise_logits, self.training)
        if c.gw_threshold is not None:
            seq_len = x.shape[-2] if x.dim() >= 3 else None  # (B, L, d): caps per sequence
            routing = gw_broadcast(
                routing, c.gw_threshold, measure=c.gw_measure, max_slots=c.gw_max_slots,
                seq_len=seq_len, training=self.training,
            )
        mask, weights = routing.mask, routing.weights
        if c.capacity_factor is not None:  # int(mask.sum()) waits for the GPU: only when needed
            capacity = expert_capacity(int(mask.sum()), c.num_experts, c.capacity_factor)
            mask = apply_capacity(routing.mask, routing.probs, capacity)
            weights = weights * mask
        out = combine(tokens, weights, mask, self.experts, path=c.dispatch)

        losses = {
            "load_balance": load_balance_loss(routing.probs, routing.mask, count=c.balance_counts),
            "z_loss": z_loss(routing.logits),
            "dynamic": dynamic_loss(routing.probs),
        }
        aux = c.balance_coef * losses["load_balance"] + c.z_coef * losses["z_loss"]
        if c.dynamic_beta:
            aux = aux + c.dynamic_beta * losses["dynamic"]
        return MoEOutput(out.view(x.shape), routing, aux, losses, self._stats(routing, mask))

    def _stats(self, routing: Routing, kept: Tensor) -> MoEStats:
        with torch.no_grad():
            T = routing.num_tokens
            routed = routing.mask
            dropped = routed & ~kept
            bcast = routing.broadcast
            return MoEStats(
                experts_per_token=routed.sum(1).float().mean() if T else routed.new_zeros((), dtype=torch.float),
                tokens_per_expert=routed.sum(0),
                dropped_pairs=dropped.sum(),
                dropped_tokens=(routed.any(1) & ~kept.any(1)).sum(),
                broadcast_ratio=bcast.float().mean() if bcast is not None and T else routed.new_zeros((), dtype=torch.float),
                flops=kept.sum() * self.experts.flops_per_assignment(),
            )

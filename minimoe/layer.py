"""The MoE layer: router -> routing function -> capacity -> dispatch/experts/combine.

Follow one token: ``MoE.forward`` computes its router logits (float32), ``MoE.route`` asks the
config's router (a spec of minimoe/routing/, or any object with its call signature) for a
Routing, ``kept_pairs`` drops pairs over an expert's
capacity (minimoe/dispatch.py), ``combine`` runs the experts (minimoe/experts.py) and adds
their outputs with the combine weights; a shared expert (DeepSeekMoE, Qwen2-MoE), if
configured, is added for every token. The layer returns the output beside the routing,
the auxiliary losses and the statistics: no loss is stored on the module, so re-running a
cell never double-counts a loss (a stateful router's layer counts its training forwards since
the last state update, only to warn when a loop never updates it). ``fine_grained`` splits
every expert into m narrower ones.

``torch.compile(layer)`` trains and infers with every router. Under compilation the experts run
as one custom operator (minimoe/compiled.py) and a router with a ``k`` dispatches T * k pairs,
so dropless top-k, noisy top-k and sigmoid routing are one graph, fullgraph or not. Top-p,
adaptive, GW broadcast, expert choice and the compute-on-demand routers (ReMoE, expert threshold,
SeqTopK) send a data-dependent number of pairs: without
fullgraph the graph breaks at that count (``nonzero``); ``fullgraph=True`` traces it as an
unbacked size. A capacity counts its slots on the host (``int(...)`` in ``kept_pairs``): a graph
break, and ``fullgraph=True`` refuses it. Checks of values assert without a host sync there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimoe.checks import check_bool, check_choice, check_float, check_int, require
from minimoe.dispatch import DISPATCH_PATHS, apply_capacity, combine, expert_capacity
from minimoe.experts import ACTIVATIONS, ConstantExperts, Experts
from minimoe.losses import dynamic_loss, load_balance_loss, sequence_balance_loss, z_loss
from minimoe.routing import (
    ROUTERS,
    Router,
    Routing,
    TopK,
    check_experts,
    check_routing,
    jittered,
    library_router,
    router_columns,
    router_from_dict,
    router_to_dict,
    update_state,
)

STALE_AFTER = 100  # training forwards of a stateful router without a state update: warn


@dataclass(frozen=True)
class MoEConfig:
    """Everything one MoE layer needs. Defaults: Mixtral-style top-2 over 8 SwiGLU experts.

    Frozen: change it with ``dataclasses.replace(config, router=TopP(p=0.3))``, which checks
    the new one again. The loss coefficients are the course's defaults (alpha = 1e-2 and the
    ST-MoE z-loss 1e-3 for every router); how L_b counts and beta of L_d come from the router
    unless set here. ``with_paper_losses()`` gives the router's paper's own coefficients.

    Shared expert: ``shared_hidden > 0`` adds one always-on MLP of that width (the experts'
    activation) to every token's output; DeepSeekMoE / DeepSeek-V3 set it to the routed width
    times the number of shared experts, Qwen2-MoE to its ``shared_expert_intermediate_size``
    with ``shared_gate=True`` (the shared output scaled by sigmoid(w^T x)).
    """

    d_model: int = 64
    d_hidden: int = 128  # width of each expert
    num_experts: int = 8
    router: Router = TopK()  # any object called as router(logits, *, training, seq_len)
    capacity_factor: float | None = None  # None = dropless
    dispatch: str = "sorted"  # "sorted" (sort-gather-scatter) | "loop" (reference)
    activation: str = "swiglu"  # "swiglu" | "gelu" | "relu"
    shared_hidden: int = 0  # width of the shared expert, run on every token; 0 = none
    shared_gate: bool = False  # Qwen2-MoE: scale the shared expert by sigmoid(w^T x)
    expert_bias: bool = False  # the routed experts' projections add biases (NLLB-MoE)
    balance_coef: float = 1e-2  # alpha of the load-balance loss
    z_coef: float = 1e-3  # ST-MoE router z-loss
    balance_count: str | None = None  # "first" (Switch) | "selected" (Top-P); None: the router's
    dynamic_coef: float | None = None  # beta of the dynamic (entropy) loss; None: the router's
    seq_balance_coef: float = 0.0  # alpha of DeepSeek-V3's sequence-wise balance loss

    def __new__(cls, *args, **kwargs) -> MoEConfig:
        # before the dataclass's __init__ says only "unexpected keyword argument 'k'": a router
        # setting passed flat (configs before router specs) gets the spec to write instead
        unknown = sorted(kwargs.keys() - {f.name for f in fields(cls)})
        if unknown:
            router = kwargs.get("router", "top_k")
            name = router if isinstance(router, str) else getattr(router, "name", "top_k")
            spec = ROUTERS.get(name, TopK).__name__
            settings = ", ".join(f"{_LEGACY.get(k, k)}={kwargs[k]!r}" for k in unknown)
            raise TypeError(
                f"MoEConfig has no field {unknown}: a router's settings belong to its spec, "
                f"e.g. MoEConfig(router={spec}({settings})) (minimoe.routing)"
            )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden", "num_experts"):
            check_int(name, getattr(self, name), 1)
        if isinstance(self.router, (str, type)) or not callable(self.router):
            raise TypeError(
                f"router must be a router object such as TopK(k=2) or TopP(p=0.4) "
                f"(names are for the command line: routing.router_from_name), got {self.router!r}"
            )
        check_experts(self.router, self.num_experts)
        check_int("router_columns", router_columns(self.router, self.num_experts), self.num_experts)
        check_choice("dispatch", self.dispatch, DISPATCH_PATHS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_int("shared_hidden", self.shared_hidden, 0)
        check_bool("shared_gate", self.shared_gate)
        check_bool("expert_bias", self.expert_bias)
        if self.shared_gate and not self.shared_hidden:
            raise ValueError("shared_gate=True needs a shared expert: set shared_hidden > 0")
        expert_capacity(1, 1, self.capacity_factor)  # validates capacity_factor
        check_float("balance_coef", self.balance_coef, 0.0)
        check_float("z_coef", self.z_coef, 0.0)
        if self.balance_count is not None:
            check_choice("balance_count", self.balance_count, ("first", "selected"))
        if self.dynamic_coef is not None:
            check_float("dynamic_coef", self.dynamic_coef, 0.0)
        check_float("seq_balance_coef", self.seq_balance_coef, 0.0)

    @property
    def balance_counts(self) -> str:
        """How L_b counts: ``balance_count``, or the router's (Top-P: selected; else first)."""
        return self.balance_count or getattr(self.router, "balance_count", "first")

    @property
    def dynamic_beta(self) -> float:
        """beta of L_d: ``dynamic_coef``, or the router's (Top-P: the paper's 1e-4; else 0)."""
        if self.dynamic_coef is not None:
            return self.dynamic_coef
        return getattr(self.router, "dynamic_coef", 0.0)

    def with_paper_losses(self) -> MoEConfig:
        """This config with the router's paper's loss coefficients (``router.paper_losses``)."""
        paper = getattr(self.router, "paper_losses", None)
        if paper is None:
            raise ValueError(f"router {self.router!r} carries no paper_losses")
        return replace(self, **paper)

    def to_dict(self) -> dict:
        """Plain data (the router by name), for checkpoints and result files."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "router": router_to_dict(self.router)
        }

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        """Inverse of ``to_dict``; also reads configs saved before router specs (router by name)."""
        data = dict(data)
        router = data.pop("router", {"name": "top_k"})
        if isinstance(router, str):
            router = _legacy_router(router, data)
        return cls(**data, router=router_from_dict(router) if isinstance(router, dict) else router)


# old flat config field -> the router spec's setting (configs saved before router specs)
_LEGACY = {
    "k": "k",
    "renormalize": "renormalize",
    "top_p": "p",
    "top_p_rule": "rule",
    "max_experts": "max_experts",
    "adaptive_threshold": "threshold",
    "adaptive_gap": "gap",
}


def _legacy_router(name: str, data: dict) -> dict:
    """The router of an old flat config (``router="top_p", top_p=0.4, gw_threshold=...``), as data;
    pops the old fields from ``data``."""
    old = {
        key: data.pop(key)
        for key in [*_LEGACY, "gw_threshold", "gw_measure", "gw_max_slots"]
        if key in data
    }
    if data.get("balance_count") == "auto":
        data["balance_count"] = None
    fields_of = (
        {f.name for f in fields(ROUTERS[name])} if name in ROUTERS else set()
    )  # else: refused below
    router = {"name": name} | {_LEGACY[k]: v for k, v in old.items() if _LEGACY.get(k) in fields_of}
    if old.get("gw_threshold") is not None:
        router = {
            "name": "gw",
            "base": router,
            "threshold": old["gw_threshold"],
            "measure": old.get("gw_measure", "normalized_entropy"),
            "max_slots": old.get("gw_max_slots"),
        }
    return router


def fine_grained(config: MoEConfig, m: int) -> MoEConfig:
    """DeepSeekMoE's fine-grained experts: each expert split into ``m`` of width d_hidden / m,
    and m times as many chosen per token, so active parameters and FLOPs per token stay equal.

    E -> m E, d_hidden -> d_hidden / m, k -> m k (``dataclasses.replace(config.router, k=...)``);
    the shared expert, if any, is kept as it is.
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
    check_int("m", m, 1)
    if config.d_hidden % m:
        raise ValueError(f"d_hidden={config.d_hidden} is not divisible by m={m}")
    k = getattr(config.router, "k", None)
    if k is None:
        raise TypeError(
            f"fine_grained scales the router's k (experts per token), and router "
            f"{config.router!r} has no k"
        )
    return replace(
        config,
        num_experts=config.num_experts * m,
        d_hidden=config.d_hidden // m,
        router=replace(config.router, k=k * m),
    )


class MoEStats(NamedTuple):
    """Routing statistics of one forward pass (detached tensors; .item() when printing).

    Counts only: everything derived (loads, imbalance, uncertainty) is in ``minimoe.analysis``.
    """

    num_tokens: Tensor  # () tokens routed (padding excluded)
    experts_per_token: Tensor  # () mean number of experts a token is sent to, before capacity
    tokens_per_expert: Tensor  # (E,) tokens routed to each expert, before capacity
    dropped_pairs: Tensor  # () (token, expert) pairs over capacity
    dropped_tokens: Tensor  # () routed tokens that lost every expert to capacity
    unrouted_tokens: Tensor  # () tokens the router sent to no expert (expert choice leaves some)
    uncertain_ratio: (
        Tensor  # () share of tokens over the GW threshold (the released code's gw_ratio)
    )
    broadcast_ratio: Tensor  # () share of tokens broadcast to all experts, after the slot cap
    # () expert FLOPs: kept pairs, the shared expert and the constant experts' (every token; no
    # router); null and identity experts cost none
    flops: Tensor
    # what a stateful router measured on these tokens for its update_state (its ``batch_measure``
    # hook; expert threshold routing: the logits); empty for the other routers
    router_measure: Tensor


class MoEOutput(NamedTuple):
    output: Tensor  # (..., d_model), the input's shape
    routing: Routing  # over the flattened tokens (T, E)
    aux_loss: Tensor  # () weighted sum of the auxiliary losses: add it to the task loss
    # unweighted: load_balance, z_loss, dynamic, sequence_balance, and the router's own (l1_reg)
    losses: dict[str, Tensor]
    stats: MoEStats


def _balanced_columns(routing: Routing) -> tuple[Tensor, Tensor]:
    """The probabilities and choices the balance loss reads: every router column where the
    router gives them (AdaMoE's null experts), else the true experts'."""
    if routing.balance_probs is not None:
        return routing.balance_probs, routing.balance_mask
    return routing.probs, routing.mask


def kept_pairs(routing: Routing, capacity_factor: float | None) -> Tensor:
    """(T, E) bool: the pairs that find a slot. Capacity is counted on the base routing's pairs;
    pairs of GW-broadcast tokens are never dropped (int(...) waits for the GPU: only with a capacity)."""
    if capacity_factor is None:
        return routing.mask
    base = routing.base_mask if routing.base_mask is not None else routing.mask
    capacity = expert_capacity(int(base.sum()), routing.num_experts, capacity_factor)
    if routing.broadcast is None:
        return apply_capacity(routing.mask, routing.probs, capacity)
    bcast = routing.broadcast[:, None]  # (T, 1)
    return apply_capacity(routing.mask & ~bcast, routing.probs, capacity) | (routing.mask & bcast)


class MoE(nn.Module):
    """A sparse Mixture-of-Experts FFN over inputs of shape (..., d_model).

    Parameters: ``gate`` (the router W_r, float32), ``gate_extra`` (more router outputs if the
    router reads them: noisy top-k's noise logits), ``experts``, ``shared`` (the shared expert,
    or None), ``shared_gate`` (its sigmoid gate w, or None) and ``constants`` (MoE++'s constant
    experts, ``experts.ConstantExperts``, when the router has them); buffers in ``router_state``
    for a router with state, and ``router_params`` for a router with trained tensors of its own
    (Gemma 4's input and per-expert scales; see ``minimoe.routing``).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        E, d = config.num_experts, config.d_model
        self.gate = nn.Linear(d, E, bias=False)  # the router W_r, kept in float32
        extra = router_columns(config.router, E) - E
        self.gate_extra = nn.Linear(d, extra, bias=False) if extra else None
        if self.gate_extra is not None:
            nn.init.zeros_(self.gate_extra.weight)  # noisy top-k: softplus(0) = 0.69 noise scale
        self.router_state = nn.Module()
        self.router_params = nn.Module()
        self._init_router_state()
        self._stale_steps = 0  # training forwards since the router state last updated
        self.experts = Experts(
            num_experts=E,
            d_model=d,
            d_hidden=config.d_hidden,
            activation=config.activation,
            bias=config.expert_bias,
        )
        # built after the routed experts: configs without them draw the same initial weights
        self.shared = (
            Experts(
                num_experts=1,
                d_model=d,
                d_hidden=config.shared_hidden,
                activation=config.activation,
            )
            if config.shared_hidden
            else None
        )
        self.shared_gate = nn.Linear(d, 1, bias=False) if config.shared_gate else None
        constants = getattr(config.router, "constant_experts", 0)  # MoE++'s, run by the layer
        self.constants = ConstantExperts(num_experts=constants, d_model=d) if constants else None
        self._register_load_state_dict_pre_hook(_rename_noise)

    def _init_router_state(self, keep_matching: bool = False) -> None:
        """Buffers from the router's ``init_state`` and trained tensors from its ``init_params``;
        ``keep_matching`` keeps current values when the names and shapes are the same (a router
        swapped for a variant of itself)."""
        router, E, d = self.config.router, self.config.num_experts, self.config.d_model
        for holder, hook, args in (
            (self.router_state, "init_state", (E,)),
            (self.router_params, "init_params", (E, d)),
        ):
            init = getattr(router, hook, None)
            new = init(*args) if init is not None else {}
            if not all(isinstance(v, Tensor) for v in new.values()):
                raise TypeError(f"{hook} of {router!r} must return a dict of tensors")
            trained = holder is self.router_params
            current = dict(holder.named_parameters() if trained else holder.named_buffers())
            if keep_matching and {k: v.shape for k, v in new.items()} == {
                k: v.shape for k, v in current.items()
            }:
                continue
            for name in current:
                delattr(holder, name)
            for name, value in new.items():
                value = value.to(self.gate.weight.device)
                if trained:
                    holder.register_parameter(name, nn.Parameter(value))
                else:
                    holder.register_buffer(name, value)

    def _router_tensors(self) -> dict[str, Tensor]:
        """What the router is called with as ``state``: its buffers, then its trained tensors."""
        return dict(self.router_state.named_buffers()) | dict(self.router_params.named_parameters())

    @property
    def stateful(self) -> bool:
        return hasattr(self.config.router, "update_state")

    def replace_config(self, **changes) -> MoE:
        """Give this layer ``dataclasses.replace(config, **changes)`` (a new router, say).

        Refused if the parameters' shapes would change; a router with other state gets fresh
        state. Returns the layer.
        """
        new = replace(self.config, **changes)
        for name in (
            "d_model",
            "d_hidden",
            "num_experts",
            "activation",
            "shared_hidden",
            "shared_gate",
            "expert_bias",
        ):
            if getattr(new, name) != getattr(self.config, name):
                raise ValueError(
                    f"replace_config cannot change {name} of a built layer "
                    f"({getattr(self.config, name)!r} -> {getattr(new, name)!r}): build a new MoE"
                )
        E = new.num_experts
        constants = [getattr(r, "constant_experts", 0) for r in (self.config.router, new.router)]
        if constants[0] != constants[1]:
            raise ValueError(
                f"replace_config cannot change constant_experts of a built layer "
                f"({constants[0]} -> {constants[1]}): build a new MoE"
            )
        if router_columns(new.router, E) != router_columns(self.config.router, E):
            raise ValueError(
                f"router {new.router!r} reads {router_columns(new.router, E)} router outputs, "
                f"this layer has {router_columns(self.config.router, E)}: build a new MoE"
            )
        self.config = new
        self._init_router_state(keep_matching=True)
        return self

    def router_logits(self, tokens: Tensor) -> Tensor:
        """(T, d) -> (T, C) float32 router outputs (C = E, or more if the router reads more)."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            x = tokens.float()
            prepare = getattr(self.config.router, "router_input", None)
            if prepare is not None:  # the router's own transform of its input (Gemma 4's norm)
                x = prepare(x, self._router_tensors())
            logits = F.linear(x, self.gate.weight.float())  # (T, E)
            if self.gate_extra is not None:
                logits = torch.cat([logits, F.linear(x, self.gate_extra.weight.float())], dim=1)
        return logits

    def route(
        self, tokens: Tensor, seq_len: int | None = None, token_ids: Tensor | None = None
    ) -> Routing:
        """The router's decision for (T, d) tokens (``token_ids`` (T,): for hash routing)."""
        router = self.config.router
        state = self._router_tensors()
        kwargs = {"state": state} if state else {}
        if getattr(router, "uses_token_ids", False):
            kwargs["token_ids"] = token_ids
        logits = self.router_logits(tokens)  # (T, C)
        if logits.numel():  # aminmax: one pass over (T, C), NaN propagates
            require(
                torch.isfinite(torch.stack(torch.aminmax(logits))).all(),
                "router logits are not finite: the MoE input or the router weights hold inf or nan",
                lambda: _why_not_finite(tokens, self.gate.weight),
            )
        routing = router(logits, training=self.training, seq_len=seq_len, **kwargs)
        # the type's name, not the repr: a constant string under torch.compile. The library's
        # routers build valid decisions (their tests): only others' values are checked
        who = f"router {type(router).__name__}"
        trusted = library_router(router)
        routing = check_routing(routing, tokens.shape[0], self.config.num_experts, who, not trusted)
        have = 0 if self.constants is None else self.constants.vector.shape[0]
        if routing.constant is not None and tuple(routing.constant.shape) != (len(tokens), have):
            raise ValueError(
                f"{who} returned Routing.constant of shape {tuple(routing.constant.shape)}; the "
                f"layer has {have} constant experts (the router's constant_experts)"
            )
        return routing

    def forward(
        self, x: Tensor, token_ids: Tensor | None = None, mask: Tensor | None = None
    ) -> MoEOutput:
        """``token_ids`` (x's shape without d_model): only routers that route by token id read it.

        ``mask`` (x's shape without d_model, bool): False marks padding. The router sees every
        position (a per-sequence rule counts the grid as laid out); padding then leaves the
        decision: no expert runs on it (its output is 0, the residual carries it), and no loss
        or statistic counts it. The returned routing covers the other tokens, in order.
        """
        c = self.config
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                f"MoE expects a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.device.type == "meta":
            raise ValueError(
                "MoE input is on the meta device: routing reads values, and meta tensors have "
                "none; build the model on a real device (or model.to_empty(device=...))"
            )
        if x.dim() < 1 or x.shape[-1] != c.d_model:
            raise ValueError(
                f"MoE expects inputs of shape (..., d_model={c.d_model}), got {tuple(x.shape)}"
            )
        tokens, routed = self._jitter(x.reshape(-1, c.d_model))  # (T, d) experts', router's
        # (B, L, d): rules per sequence (GW's slot cap, the sequence-wise loss)
        seq_len = x.shape[-2] if x.dim() >= 3 and x.shape[-2] else None
        ids = None if token_ids is None else token_ids.reshape(-1)
        routing = self.route(routed, seq_len, ids)
        grid = routing  # every position: the sequence-wise loss counts per sequence
        valid = None if mask is None else _token_mask(mask, x)  # (T,) True: a real token
        if valid is not None:  # boolean selection: a data-dependent size (a graph break)
            routing, tokens = routing.rows(valid), tokens[valid]
        if self.stateful and self.training and torch.is_grad_enabled():
            self._count_stale_step()
        kept = kept_pairs(routing, c.capacity_factor)
        weights = routing.weights * kept if c.capacity_factor is not None else routing.weights
        k = getattr(c.router, "k", None)  # None: the mean experts per token
        fixed = k if isinstance(k, int) and not isinstance(k, bool) else None
        # compiled, a router with k experts per token dispatches T * k pairs: fixed shapes
        out = combine(tokens, weights, kept, self.experts, path=c.dispatch, k=fixed)
        if routing.identity is not None:  # identity experts: y += g x (LongCat-Flash)
            out = out + routing.identity[:, None].to(out.dtype) * tokens
        if routing.constant is not None:  # constant experts: y += sum_j g_j E_j(x) (MoE++)
            out = out + self.constants(tokens, routing.constant)
        if self.shared is not None:  # every token, dropped or not
            out = out + self._shared_output(tokens)

        losses = {
            "load_balance": load_balance_loss(
                *_balanced_columns(routing), count=c.balance_counts, weights=self._balance_weights()
            ),
            "z_loss": z_loss(routing.logits),
            "dynamic": dynamic_loss(routing.probs),
            # (T, d) inputs: the whole batch is one sequence
            "sequence_balance": sequence_balance_loss(
                grid.probs, grid.mask, seq_len or max(grid.num_tokens, 1), k, valid=valid
            ),
        }
        aux = c.balance_coef * losses["load_balance"] + c.z_coef * losses["z_loss"]
        if c.dynamic_beta:
            aux = aux + c.dynamic_beta * losses["dynamic"]
        if c.seq_balance_coef:  # only when on: configs without it keep their exact numbers
            aux = aux + c.seq_balance_coef * losses["sequence_balance"]
        own = getattr(c.router, "aux_losses", None)  # a router's own loss (ReMoE's L1 on gates)
        if own is not None:
            for name, (coef, loss) in own(routing, self._router_tensors()).items():
                losses[name] = loss
                aux = aux + coef * loss
        if valid is not None:  # padding's rows stay 0
            out = out.new_zeros(valid.shape[0], c.d_model).index_put((valid,), out)
        return MoEOutput(out.view(x.shape), routing, aux, losses, self._stats(routing, kept))

    def _balance_weights(self) -> Tensor | None:
        """eta per balanced column from the router's ``balance_weights`` hook (MoE++), or None."""
        hook = getattr(self.config.router, "balance_weights", None)
        eta = hook(self.config.num_experts) if hook is not None else None
        return None if eta is None else eta.to(self.gate.weight.device)

    def _jitter(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(the experts' tokens, the router's tokens). In training, a router with
        ``input_jitter`` eps > 0 reads its tokens times U(1 - eps, 1 + eps) (``jittered``);
        with ``jitter_experts`` the experts (and a shared expert) run on them too, as in Hugging
        Face's blocks; without, the router alone jitters its float32 copy (Switch's router)."""
        router = self.config.router
        eps = getattr(router, "input_jitter", 0.0)
        if not (eps and self.training):
            return tokens, tokens
        draws = getattr(router, "jitter_draws", 1)
        if getattr(router, "jitter_experts", True):
            tokens = jittered(tokens, eps, draws)
            return tokens, tokens
        return tokens, jittered(tokens.float(), eps, draws)

    def _shared_output(self, tokens: Tensor) -> Tensor:
        """(T, d) -> (T, d) the shared expert on every token, in the tokens' dtype."""
        y = self.shared.expert(0, tokens)  # (T, d) under autocast: the autocast dtype
        if self.shared_gate is not None:
            # Qwen2-MoE: y = sigmoid(w^T x) * Shared(x)
            y = torch.sigmoid(self.shared_gate(tokens)) * y  # (T, 1) * (T, d)
        # summed in the input's dtype, as the routed experts' outputs are (dispatch.py)
        return y.to(tokens.dtype)

    @torch.no_grad()
    def update_router_state(self, stats: MoEStats) -> None:
        """After an optimizer step: let a stateful router update its buffers from the step's
        statistics (the training loop calls this; ``ExpertParallelMoE`` sums counts first)."""
        if self.stateful:
            update_state(self.config.router, dict(self.router_state.named_buffers()), stats)
            self._stale_steps = 0

    def _count_stale_step(self) -> None:
        """A hand-written loop that never calls ``update_router_state`` trains a router whose
        bias never moves, silently: warn once it has gone ``STALE_AFTER`` training forwards."""
        if torch.compiler.is_compiling():  # a Python counter would recompile the graph
            return
        self._stale_steps += 1
        if self._stale_steps == STALE_AFTER:
            warnings.warn(
                f"{self.config.router!r} has state that {STALE_AFTER} training forwards have not "
                "updated: after each optimizer step call layer.update_router_state(out.stats), "
                "or once minimoe.train.router_state_hook(optimizer, model) (train() does it)",
                UserWarning,
                stacklevel=3,
            )

    def _stats(self, routing: Routing, kept: Tensor) -> MoEStats:
        with torch.no_grad():
            T = routing.num_tokens
            routed = routing.mask
            zero = routed.new_zeros((), dtype=torch.float)
            flops = kept.sum() * self.experts.flops_per_assignment()
            if self.shared is not None:
                flops = flops + T * self.shared.flops_per_assignment()
            if routing.constant is not None:  # every token, all c at once: O(c d)
                flops = flops + T * self.constants.flops_per_token()

            measure = getattr(self.config.router, "batch_measure", None)

            def share(flags: Tensor | None) -> Tensor:
                return flags.float().mean() if flags is not None and T else zero

            return MoEStats(
                num_tokens=torch.full((), T, dtype=torch.long, device=routed.device),
                experts_per_token=routed.sum(1).float().mean() if T else zero,
                tokens_per_expert=routed.sum(0),
                dropped_pairs=(routed & ~kept).sum(),
                dropped_tokens=(routed.any(1) & ~kept.any(1)).sum(),
                unrouted_tokens=(~routed.any(1)).sum(),
                uncertain_ratio=share(routing.uncertain),
                broadcast_ratio=share(routing.broadcast),
                flops=flops,
                router_measure=routing.logits.new_zeros(0) if measure is None else measure(routing),
            )


def _token_mask(mask: Tensor, x: Tensor) -> Tensor:
    """``mask`` checked against the input ``x`` (..., d_model): (T,) bool on x's device."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (False marks padding), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if mask.shape != x.shape[:-1]:
        raise ValueError(
            f"mask must have the input's shape without d_model, {tuple(x.shape[:-1])}, "
            f"got {tuple(mask.shape)}"
        )
    return mask.reshape(-1).to(x.device)


def _why_not_finite(tokens: Tensor, gate: Tensor) -> str:
    """Which input made the router logits inf or nan (on the failure path only)."""
    for name, t in (("the MoE input", tokens), ("the router weights (gate)", gate)):
        bad = ~torch.isfinite(t)
        if bad.any():
            row = bad.flatten(1).any(1).nonzero()[0, 0].item()
            return f"{name} holds {t[bad][0].item()} (first in row {row})"
    return f"they overflowed float32 (largest |input| {tokens.abs().max().item():.3g})"


def _rename_noise(state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints saved before router specs call noisy top-k's weights ``noise``."""
    if prefix + "noise.weight" in state_dict:
        state_dict[prefix + "gate_extra.weight"] = state_dict.pop(prefix + "noise.weight")


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of ``model``, bottom to top (the one place this is computed)."""
    return [m for m in model.modules() if isinstance(m, MoE)]

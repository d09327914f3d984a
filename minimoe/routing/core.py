"""The decision object, the checks every router shares, the one rule for ties, and uncertainty.

Nothing here knows a routing method: ``classic.py`` and ``production.py`` build on it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from minimoe.checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    host_checkable,
    require,
)


@dataclass(frozen=True)
class Routing:
    """One routing decision for T tokens over E experts.

    logits:  (T, E) router logits, float32.
    probs:   (T, E) softmax(logits), float32; the full distribution, before any selection.
    mask:    (T, E) bool, True where the token is sent to the expert (the set S).
    weights: (T, E) combine weights g, exactly 0 outside ``mask``.
    broadcast: (T,) bool, tokens sent to every expert by GW broadcast (None without it).
    uncertain: (T,) bool, tokens over the GW threshold, before the per-sequence slot cap.
    base_mask: (T, E) bool, the mask before GW broadcast (capacity is counted on its pairs).
    identity: (T,) summed weight of the identity experts a token chose (LongCat-Flash's
        zero-computation experts): the layer adds identity * x (None without them).
    constant: (T, c) combine weight of each of the c constant experts (MoE++), 0 where the
        token did not choose it: the layer runs them (``experts.ConstantExperts``), None without.
    balance_probs, balance_mask: (T, C) the probabilities and choices over every router column,
        null and identity experts included: the layer's balance loss counts them all (AdaMoE);
        None: the balance loss is over the true experts (``probs``, ``mask``).
    """

    logits: Tensor
    probs: Tensor
    mask: Tensor
    weights: Tensor
    broadcast: Tensor | None = None
    uncertain: Tensor | None = None
    base_mask: Tensor | None = None
    identity: Tensor | None = None
    constant: Tensor | None = None
    balance_probs: Tensor | None = None
    balance_mask: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[0]

    @property
    def num_experts(self) -> int:
        return self.mask.shape[1]

    @property
    def expert_counts(self) -> Tensor:
        """(T,) how many experts each token is sent to (their mean is experts per token)."""
        return self.mask.sum(dim=1)

    @property
    def tokens_per_expert(self) -> Tensor:
        """(E,) how many tokens each expert receives."""
        return self.mask.sum(dim=0)

    def to(self, device: torch.device | str) -> Routing:
        """A detached copy on ``device`` (the recorder keeps CPU copies)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Routing(
            **{k: None if v is None else v.detach().to(device) for k, v in moved.items()}
        )

    def rows(self, keep: Tensor) -> Routing:
        """The decision for the tokens ``keep`` selects ((T,) bool), in their order."""
        kept = {f.name: getattr(self, f.name) for f in fields(self)}
        return Routing(**{k: None if v is None else v[keep] for k, v in kept.items()})

    @staticmethod
    def cat(parts: list[Routing]) -> Routing:
        """Several decisions over the same experts as one, token after token."""
        if not parts:
            raise ValueError("no routing to concatenate (was the model run inside the recorder?)")
        out = {}
        for f in fields(Routing):
            values = [getattr(r, f.name) for r in parts]
            if all(v is None for v in values):
                out[f.name] = None
            elif f.name == "base_mask":
                out[f.name] = torch.cat(
                    [r.base_mask if r.base_mask is not None else r.mask for r in parts]
                )
            elif f.name in ("broadcast", "uncertain", "identity", "constant"):
                kind = torch.bool if f.name in ("broadcast", "uncertain") else torch.float
                given = next(v for v in values if v is not None)
                out[f.name] = torch.cat(
                    [
                        v
                        if v is not None
                        else torch.zeros(
                            (r.num_tokens, *given.shape[1:]), dtype=kind, device=r.mask.device
                        )
                        for v, r in zip(values, parts)
                    ]
                )
            else:
                out[f.name] = torch.cat(values)
        return Routing(**out)


# ---- checks shared by the functions and the specs -----------------------------------------


def check_logits(logits: Tensor) -> Tensor:
    """Validate router logits and return them as float32 (the router runs in float32).

    On an accelerator and under ``torch.compile`` finiteness is an asynchronous assert
    (``checks.require``: RuntimeError, no host sync).
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(
            f"logits must have shape (tokens, experts), got shape {tuple(logits.shape)}"
        )
    if logits.shape[1] < 1:
        raise ValueError(
            f"logits must have at least one expert column, got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")
    if logits.numel():
        finite = torch.isfinite(logits).all()  # () bool
        if not host_checkable(finite):
            require(finite, "logits must be finite")
        elif not finite:
            bad = logits[~torch.isfinite(logits)].flatten()[0].item()
            raise ValueError(f"logits must be finite, found {bad}")
    return logits.float()


def _check_probs(probs: Tensor, name: str = "probs") -> None:
    """Refuse what is not a probability distribution per row (logits passed by mistake, say)."""
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(probs).__name__}")
    if probs.dim() < 1 or probs.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., experts), got shape {tuple(probs.shape)}")
    if probs.numel() == 0:
        return
    sums = probs.float().sum(dim=-1)
    # loose: probabilities rounded to bfloat16 still pass; logits almost always have negatives
    if (probs < 0).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-2):
        raise ValueError(
            f"{name} must be probabilities (>= 0, rows summing to 1), got rows summing to "
            f"{sums.flatten()[0].item():.4g} with min {probs.min().item():.4g}: logits? "
            "take their softmax first"
        )


def resolve_renormalize(spec: Any) -> None:
    """Unset ``renormalize`` (None) means True. With k = 1 that gives g = P_i / P_i = 1 and the
    task loss no path to the router, silently: so unset there warns (Switch keeps g = P_max)."""
    if spec.renormalize is None:
        if spec.k == 1:
            name = type(spec).__name__
            warnings.warn(
                f"{name}(k=1) renormalizes by default: every weight is 1 and the router gets no "
                f"gradient; pass renormalize=False (Switch: g = P_max), or renormalize=True if "
                "that is meant",
                UserWarning,
                stacklevel=4,  # the caller of the spec's __init__
            )
        object.__setattr__(spec, "renormalize", True)
    check_bool("renormalize", spec.renormalize)


def check_routing(
    routing: Any, num_tokens: int, num_experts: int, who: str, values: bool = True
) -> Routing:
    """Refuse a decision the layer cannot use, naming the field (``who`` names the router).

    Types, shapes and dtypes are checked on the host; with ``values``, also the values (finite,
    weights only inside the mask, a routed token with some nonzero weight) with ``require``: no
    host sync on a GPU, but about 1 ms per layer at T=2048, E=64 on one CPU core.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"{who} returned {type(routing).__name__}, not a Routing")
    T, E = num_tokens, num_experts
    wanted = {"mask": (T, E), "weights": (T, E), "probs": (T, E), "logits": None}
    wanted |= {"broadcast": (T,), "uncertain": (T,), "base_mask": (T, E)}
    device = routing.mask.device if isinstance(routing.mask, Tensor) else None
    for name, shape in wanted.items():
        value = getattr(routing, name)
        if value is None and name in ("broadcast", "uncertain", "base_mask"):
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{who} returned Routing.{name}={value!r}, not a tensor")
        got = tuple(value.shape)
        if (got != shape) if shape else (len(got) != 2 or got[0] != T):
            expected = shape or f"({T}, columns)"
            raise ValueError(f"{who} returned Routing.{name} of shape {got}, expected {expected}")
        boolean = name in ("mask", "broadcast", "uncertain", "base_mask")
        if boolean != (value.dtype == torch.bool) or not (boolean or value.is_floating_point()):
            kind = "bool" if boolean else "floating point"
            raise TypeError(f"{who} returned Routing.{name} of dtype {value.dtype}, not {kind}")
        if value.device != device:
            raise ValueError(
                f"{who} returned Routing.{name} on {value.device}, the mask on {device}"
            )
    if not values:
        return routing
    for name in ("logits", "probs", "weights"):
        value = getattr(routing, name)
        if value.numel():  # aminmax: one pass, NaN propagates
            require(
                torch.isfinite(torch.stack(torch.aminmax(value))).all(),
                f"{who} returned non-finite Routing.{name}",
                lambda v=value: f"found {v[~torch.isfinite(v)].flatten()[0].item()}",
            )
    mask, weights = routing.mask, routing.weights
    require(
        ((weights != 0) > mask).any().logical_not(),
        f"{who} returned nonzero Routing.weights outside Routing.mask (they would be ignored)",
    )
    if weights.numel():  # float reductions per row: faster on CPU than a bool tensor's any(dim)
        require(
            ((weights.abs().amax(dim=1) > 0) | (mask.sum(dim=1) == 0)).all(),
            f"{who} returned all-zero Routing.weights for a token its mask sends to experts",
        )
    return routing


def jittered(tokens: Tensor, eps: float, draws: int = 1) -> Tensor:
    """(T, d) ``tokens`` times U(1 - eps, 1 + eps) drawn per element, ``draws`` times over.

    Hugging Face's router jitter (Mixtral's and Switch's ``router_jitter_noise``, DBRX's
    ``moe_jitter_eps``, PhiMoE's ``input_jitter_noise``), drawn as it draws: one
    ``torch.empty_like(tokens).uniform_(1 - eps, 1 + eps)`` per draw, from torch's global
    generator, in the tokens' dtype; so under one seed the same numbers. The layer applies it in
    training only (``MoE.forward``; the router interface in ``minimoe.routing``).
    """
    for _ in range(draws):
        tokens = tokens * torch.empty_like(tokens).uniform_(1.0 - eps, 1.0 + eps)
    return tokens


def check_jitter(spec: Any) -> None:
    """The input-jitter settings a spec carries: eps >= 0, whether the experts see the jitter,
    and (where the spec has it) the number of draws."""
    check_float("input_jitter", spec.input_jitter, 0.0)
    check_bool("jitter_experts", spec.jitter_experts)
    if hasattr(spec, "jitter_draws"):
        check_int("jitter_draws", spec.jitter_draws, 1)


def check_recipe(spec: Any) -> None:
    check_choice("balance_count", spec.balance_count, ("first", "selected"))
    check_float("dynamic_coef", spec.dynamic_coef, 0.0)


# ---- first choice and selection: one rule for ties everywhere -----------------------------


def top_expert(probs: Tensor) -> Tensor:
    """(...,) the expert with the largest probability; exact ties go to the lowest index.

    The one first-choice rule of the library: routing, the Switch balance loss and the
    analysis (``analysis.first_choice(routing)``) all use it (``torch.argmax`` returns the
    first maximal index).
    """
    return probs.argmax(dim=-1)


def first_choice(probs: Tensor) -> Tensor:
    """Deprecated name of ``top_expert``: ``analysis.first_choice`` takes a Routing instead."""
    warnings.warn(
        "routing.first_choice(probs) is now routing.top_expert(probs); "
        "analysis.first_choice(routing) takes a Routing",
        DeprecationWarning,
        stacklevel=2,
    )
    return top_expert(probs)


def _mask_of_top(scores: Tensor, k: int) -> Tensor:
    """(T, E) bool mask of the k largest scores per row; exact ties at the k-th value go to the
    lowest indices (the argmax rule), whatever order ``torch.topk`` returns them in."""
    kth = scores.topk(k, dim=1).values[:, k - 1 :]  # (T, 1) the k-th largest score
    above = scores > kth
    tied = scores == kth
    return above | (tied & (tied.cumsum(dim=1) <= k - above.sum(dim=1, keepdim=True)))


def _from_mask(logits: Tensor, probs: Tensor, mask: Tensor, renormalize: bool) -> Routing:
    """Combine weights = probs on the mask, optionally renormalized over the selected set."""
    weights = probs * mask  # exactly 0 outside S
    if renormalize:
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(
            torch.finfo(probs.dtype).tiny
        )
    return Routing(logits=logits, probs=probs, mask=mask, weights=weights)


# ---- uncertainty measures -------------------------------------------------------------


def _entropy(probs: Tensor) -> Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)


def entropy(probs: Tensor) -> Tensor:
    """H(P) = -sum_i P_i log P_i in nats, per row: (..., E) -> (...). 0 <= H <= ln E.

    ``probs`` must be probabilities (rows summing to 1): logits are refused, not misread.
    """
    _check_probs(probs)
    return _entropy(probs)


def normalized_entropy(probs: Tensor) -> Tensor:
    """H(P) / ln E in [0, 1]: 0 for a one-hot router, 1 for a uniform one."""
    _check_probs(probs)
    num_experts = probs.shape[-1]
    if num_experts < 2:
        return torch.zeros(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    return _entropy(probs) / math.log(num_experts)


def top_gap(probs: Tensor) -> Tensor:
    """p1 - p2, the margin between the two most likely experts: (..., E) -> (...)."""
    _check_probs(probs)
    if probs.shape[-1] < 2:
        return torch.ones(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


UNCERTAINTY = {"entropy": entropy, "normalized_entropy": normalized_entropy}


def _uncertainty(probs: Tensor, measure: str) -> Tensor:
    """``uncertainty`` without the input check (inside the layer: no device sync)."""
    h = _entropy(probs)
    return h if measure == "entropy" or probs.shape[-1] < 2 else h / math.log(probs.shape[-1])


def uncertainty(probs: Tensor, measure: str = "normalized_entropy") -> Tensor:
    """Per-token uncertainty by name: ``entropy`` (nats, in [0, ln E]) or ``normalized_entropy``."""
    check_choice("measure", measure, tuple(UNCERTAINTY))
    return UNCERTAINTY[measure](probs)


def check_threshold(threshold: Any, measure: str, num_experts: int | None) -> float:
    """A GW threshold in [0, max of ``measure``] (ln E nats for ``entropy``, 1 when normalized)."""
    check_choice("measure", measure, tuple(UNCERTAINTY))
    if measure == "normalized_entropy":
        upper = 1.0
    else:
        upper = math.log(num_experts) if num_experts is not None else math.inf
    return check_float("threshold", threshold, 0.0, upper)


def is_uncertain(probs: Tensor, threshold: float, measure: str = "normalized_entropy") -> Tensor:
    """(T,) bool: uncertainty(probs, measure) >= threshold, GW-MoE's rule for broadcasting.

    float32 rounding puts a uniform router's entropy a hair below ln E: the 1e-6 allowance
    keeps perfectly uncertain tokens uncertain at the maximum threshold.
    """
    check_threshold(threshold, measure, probs.shape[-1])
    return uncertainty(probs, measure) >= threshold - 1e-6


# ---- the router interface (see the package docstring) ------------------------------------------


@runtime_checkable
class Router(Protocol):
    """What a layer asks of a router (see the module docstring for the optional hooks)."""

    def __call__(
        self, logits: Tensor, *, training: bool, seq_len: int | None = None
    ) -> Routing: ...


def router_columns(router: Router, num_experts: int) -> int:
    """How many router outputs ``router`` reads (E unless it says otherwise)."""
    hook = getattr(router, "router_columns", None)
    return num_experts if hook is None else hook(num_experts)


def check_experts(router: Router, num_experts: int) -> None:
    """Let the router refuse settings that do not fit ``num_experts`` (its optional hook)."""
    hook = getattr(router, "check_experts", None)
    if hook is not None:
        hook(num_experts)


def update_state(router: Router, state: dict[str, Tensor], stats: Any) -> None:
    """Run the router's ``update_state(state, stats)`` hook on its state tensors, in place; a hook
    that rebinds an entry (``state["b"] = state["b"] + 1``) has the new values copied in."""
    given = dict(state)
    router.update_state(given, stats)
    for name, value in given.items():
        old = state.get(name)
        if old is None or not isinstance(value, Tensor) or value.shape != old.shape:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
            raise ValueError(
                f"update_state of {router!r} set state[{name!r}] to {got}: it may only "
                "update the tensors of init_state, keeping their shapes"
            )
        if value is not old:
            old.copy_(value)


def library_router(router: Router) -> bool:
    """A spec of minimoe.routing, wrapping (GW's ``base``) only such specs."""
    base = getattr(router, "base", None)
    own = type(router).__module__.startswith("minimoe.routing.")
    return own and (base is None or library_router(base))

"""Routing: from router logits to one decision object.

Every routing method is a small pure function ``logits (T, E) -> Routing`` (or
``Routing -> Routing`` for GW broadcast), and a frozen *router spec* (``TopK(k=2)``,
``TopP(p=0.4)``, ...) that holds the method's settings, checks them once, carries its paper's
loss recipe and is what a layer is configured with. A Routing says, for each token, which
experts it goes to (``mask``) and with which combine weights (``weights``), next to the full
softmax (``probs``) that losses and uncertainty measures need. Dispatch knows nothing of how
the decision was made; this file knows nothing of dispatch.

Notation (see PAPERS.md): T tokens, E experts, P = softmax(logits) in float32, S the
set of experts a token is sent to, y = sum_{i in S} g_i * Expert_i(x).

**The router interface.** Any object ``router`` with

    router(logits, *, training: bool, seq_len: int | None = None) -> Routing

is a router: ``MoEConfig(router=router)`` trains it, no library edit needed. ``seq_len`` is
the length of the sequences the T tokens were flattened from (None: one sequence). Optional:

- ``balance_count`` ("first" | "selected") and ``dynamic_coef`` (beta of L_d): how the layer's
  load-balance loss counts and the default weight of the dynamic loss (defaults "first", 0);
- ``router_columns(num_experts) -> int``: router outputs it reads (default E; noisy top-k
  reads E more, the noise logits, which come last and start at zero);
- ``check_experts(num_experts)``: refuse settings that do not fit E (raise ValueError);
- **state not trained by gradient** (a bias, a running count): ``init_state(num_experts)``
  returns named tensors that the layer keeps as buffers (saved with the model, moved with
  it); the router is then called with ``state=`` those buffers, and
  ``update_state(state, stats)`` is called by the training loop after each optimizer step
  with that step's ``MoEStats`` (under expert parallelism their counts are summed over the
  processes first). It is never called inside ``forward``: re-running a cell changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ROUTERS",
    "Adaptive",
    "GWBroadcast",
    "NoisyTopK",
    "Router",
    "Routing",
    "TopK",
    "TopP",
    "adaptive",
    "entropy",
    "first_choice",
    "gw_broadcast",
    "is_uncertain",
    "noisy_top_k",
    "normalized_entropy",
    "router_from_dict",
    "router_from_name",
    "router_to_dict",
    "top_gap",
    "top_k",
    "top_p",
    "uncertainty",
]


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
    """

    logits: Tensor
    probs: Tensor
    mask: Tensor
    weights: Tensor
    broadcast: Tensor | None = None
    uncertain: Tensor | None = None
    base_mask: Tensor | None = None

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
            elif f.name in ("broadcast", "uncertain"):
                out[f.name] = torch.cat(
                    [
                        v
                        if v is not None
                        else torch.zeros(r.num_tokens, dtype=torch.bool, device=r.mask.device)
                        for v, r in zip(values, parts)
                    ]
                )
            else:
                out[f.name] = torch.cat(values)
        return Routing(**out)


# ---- checks shared by the functions and the specs -----------------------------------------


def check_logits(logits: Tensor) -> Tensor:
    """Validate router logits and return them as float32 (the router runs in float32)."""
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
    if logits.numel() and not torch.isfinite(logits).all():
        bad = logits[~torch.isfinite(logits)].flatten()[0].item()
        raise ValueError(f"logits must be finite, found {bad}")
    return logits.float()


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high], or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {name}={value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {name}={value!r}")
    return value


def check_float(
    name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False
) -> float:
    """``value`` as a finite float in [low, high] ((low, high] if ``low_open``), else an error naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {name}={value!r}")
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite number in {interval}, got {name}={value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {name}={value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}")
    return value


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


# ---- first choice and selection: one rule for ties everywhere -----------------------------


def first_choice(probs: Tensor) -> Tensor:
    """(...,) the expert with the largest probability; exact ties go to the lowest index.

    The one first-choice rule of the library: routing, the Switch balance loss and the
    analysis all use it (``torch.argmax`` returns the first maximal index).
    """
    return probs.argmax(dim=-1)


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


# ---- the routing functions (what the notebooks build; the specs call them) ----------------


def top_k(logits: Tensor, k: int = 2, renormalize: bool = True) -> Routing:
    """Top-K routing (Shazeer 2017, GShard, Mixtral, Switch).

    P = softmax(logits) in float32; S = the k largest P_i.
    Mixtral (``renormalize=True``): g_i = P_i / sum_{j in S} P_j.
    Switch (k=1, ``renormalize=False``): g_i = P_i, so the router still gets a gradient.
    Softmax first, then top-k: taking the softmax over the top-k logits instead would give
    top-1 a constant weight of 1 and no gradient.
    """
    logits = check_logits(logits)
    check_int("k", k, 1, logits.shape[1])
    check_bool("renormalize", renormalize)
    probs = logits.softmax(dim=-1)  # (T, E)
    return _from_mask(logits, probs, _mask_of_top(probs, k), renormalize)


def noisy_top_k(
    logits: Tensor,
    noise_logits: Tensor,
    k: int = 2,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Routing:
    """Noisy top-k gating (Shazeer et al. 2017, Eq. 3-5).

    H_i = (W_g x)_i + N(0, 1) * softplus((W_noise x)_i); keep the top k of H and take the
    softmax over them only (g is 0 elsewhere). Noise only in training: at evaluation
    H = W_g x. ``probs`` is the noise-free softmax, so losses and uncertainty measures see
    the router's own belief.
    """
    logits = check_logits(logits)
    noise_logits = check_logits(noise_logits)
    if noise_logits.shape != logits.shape:
        raise ValueError(
            f"noise_logits shape {tuple(noise_logits.shape)} != logits shape {tuple(logits.shape)}"
        )
    check_int("k", k, 1, logits.shape[1])
    check_bool("training", training)
    noisy = logits
    if training:
        eps = torch.randn(logits.shape, generator=generator, device=logits.device)
        noisy = logits + eps * F.softplus(noise_logits)  # (T, E)
    mask = _mask_of_top(noisy, k)
    weights = noisy.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # softmax over the kept k
    return Routing(logits=logits, probs=logits.softmax(dim=-1), mask=mask, weights=weights)


def top_p(
    logits: Tensor,
    p: float = 0.4,
    rule: str = "paper",
    max_experts: int | None = None,
) -> Routing:
    """Top-P dynamic routing (Huang et al. 2024, "Harder Tasks Need More Experts").

    Sort P descending; keep the smallest prefix whose cumulative sum reaches p.
    ``rule="paper"``: the prefix ends at the first index where cumsum >= p.
    ``rule="code"``: the official release keeps up to and including the first index where
    cumsum > p (strict); the two differ only when a cumulative sum equals p exactly.
    At least one expert, no maximum unless ``max_experts`` (our addition) caps it.
    g_i = P_i, not renormalized; the same rule in training and inference.
    """
    logits = check_logits(logits)
    check_float("p", p, 0.0, 1.0, low_open=True)
    check_choice("rule", rule, ("paper", "code"))
    if max_experts is not None:
        check_int("max_experts", max_experts, 1)
    num_experts = logits.shape[1]
    probs = logits.softmax(dim=-1)  # (T, E)
    sorted_p, order = probs.sort(dim=1, descending=True, stable=True)  # (T, E)
    cum = sorted_p.cumsum(dim=1)  # (T, E)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)  # mass before each rank
    # rank r is kept while the prefix before it has not yet reached p
    keep_sorted = before < p if rule == "paper" else before <= p
    keep_sorted[:, 0] = True  # at least one expert
    if max_experts is not None:
        keep_sorted[:, min(max_experts, num_experts) :] = False
    mask = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return _from_mask(logits, probs, mask, renormalize=False)


def adaptive(
    logits: Tensor,
    threshold: float = 0.1,
    gap: str = "raw",
    renormalize: bool = False,
) -> Routing:
    """Adaptive gating (Li et al., EMNLP 2023): each token uses one or two experts.

    Let i, j be the top-1 and top-2 experts. If the gap between their probabilities is
    within ``threshold`` (gap <= threshold) the token goes to both, otherwise to i alone.
    ``gap="raw"`` (default): R_i - R_j on the softmax values, the rule as written, on the
    same probabilities that are the weights (Eq. 3); softmax is the normalization, and no
    step the paper leaves undefined is added. ``gap="normalized"``: (R_i - R_j) / (R_i + R_j),
    our reading of "normalizes the expert probability": scale-free, and never smaller than
    the raw gap (R_i + R_j <= 1), so at the same T it sends at most as many tokens to two
    experts (as many when R_i + R_j = 1). Threshold 0 is exact top-1.
    Weights are the softmax values (Eq. 3); ``renormalize=True`` rescales them over S.
    """
    logits = check_logits(logits)
    check_float("threshold", threshold, 0.0, 1.0)
    check_choice("gap", gap, ("raw", "normalized"))
    check_bool("renormalize", renormalize)
    probs = logits.softmax(dim=-1)  # (T, E)
    first = first_choice(probs)[:, None]  # (T, 1)
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, first, True)
    if probs.shape[1] >= 2:
        second = first_choice(probs.scatter(1, first, -1.0))[:, None]  # (T, 1) the runner-up
        p1, p2 = probs.gather(1, first).squeeze(1), probs.gather(1, second).squeeze(1)  # (T,)
        diff = p1 - p2 if gap == "raw" else (p1 - p2) / (p1 + p2)
        # threshold 0 is exact top-1 (a tie of p1 = p2 included); threshold 1 always sends to both
        two = (diff <= threshold) if threshold > 0 else torch.zeros_like(diff, dtype=torch.bool)
        mask.scatter_(1, second, two[:, None])
    return _from_mask(logits, probs, mask, renormalize)


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


def gw_broadcast(
    routing: Routing,
    threshold: float,
    measure: str = "normalized_entropy",
    max_slots: int | None = None,
    seq_len: int | None = None,
    training: bool = True,
) -> Routing:
    """GW-MoE broadcast (Wu et al. 2024): uncertain tokens go to every expert in training.

    A token is uncertain when its uncertainty (``measure`` of the full softmax P) is
    >= ``threshold``. In training, uncertain tokens get mask = all experts and
    weights = P (sum to 1), so y = sum_e P_e Expert_e(x); certain tokens keep the base
    routing. At evaluation (``training=False``) the base routing is returned unchanged:
    inference costs exactly what the base top-k costs.

    The released code thresholds raw entropy (``measure="entropy"``; 1.6 or 1.8 nats with
    E = 8); ``normalized_entropy`` (H / ln E) is the teaching default.
    ``max_slots`` caps broadcast tokens per sequence, first tokens first, as the official
    code does; it needs the layout: tokens are rows of a (batch, seq_len) grid flattened
    row-major, so pass ``seq_len`` (the MoE layer does this for 3-D inputs). Without
    ``seq_len`` the whole batch counts as one sequence. The result keeps both sets:
    ``uncertain`` before the cap (the released code's ``gw_ratio`` is its share) and
    ``broadcast`` after it; ``base_mask`` is the base routing's mask.
    """
    check_threshold(threshold, measure, routing.num_experts)
    if max_slots is not None:
        check_int("max_slots", max_slots, 0)
    check_bool("training", training)
    num_tokens = routing.num_tokens
    if seq_len is not None:
        check_int("seq_len", seq_len, 1)
        if num_tokens % seq_len:
            raise ValueError(f"seq_len={seq_len} does not divide the number of tokens {num_tokens}")
    if not training:
        return routing
    uncertain = _uncertainty(routing.probs, measure) >= threshold - 1e-6  # (T,) is_uncertain
    chosen = uncertain
    if max_slots is not None and num_tokens:
        per_seq = uncertain.view(-1, seq_len or num_tokens)  # (B, L)
        chosen = (per_seq & (per_seq.cumsum(dim=1) <= max_slots)).view(-1)  # first tokens first
    mask = routing.mask | chosen[:, None]
    weights = torch.where(chosen[:, None], routing.probs, routing.weights)
    return replace(
        routing,
        mask=mask,
        weights=weights,
        broadcast=chosen,
        uncertain=uncertain,
        base_mask=routing.mask,
    )


# ---- router specs: one frozen object per method ---------------------------------------------


@runtime_checkable
class Router(Protocol):
    """What a layer asks of a router (see the module docstring for the optional hooks)."""

    def __call__(
        self, logits: Tensor, *, training: bool, seq_len: int | None = None
    ) -> Routing: ...


def _check_recipe(spec: Any) -> None:
    check_choice("balance_count", spec.balance_count, ("first", "selected"))
    check_float("dynamic_coef", spec.dynamic_coef, 0.0)


@dataclass(frozen=True)
class TopK:
    """Top-K (Mixtral: ``renormalize=True``; Switch: ``k=1, renormalize=False``): ``top_k``.

    Paper recipe: Switch balance loss on first choices, alpha = 1e-2; no z-loss (ST-MoE added it).
    """

    k: int = 2
    renormalize: bool = True
    balance_count: str = "first"
    dynamic_coef: float = 0.0
    name: ClassVar[str] = "top_k"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        check_bool("renormalize", self.renormalize)
        _check_recipe(self)

    def check_experts(self, num_experts: int) -> None:
        check_int("k", self.k, 1, num_experts)

    def __call__(self, logits: Tensor, *, training: bool, seq_len: int | None = None) -> Routing:
        return top_k(logits, self.k, renormalize=self.renormalize)


@dataclass(frozen=True)
class NoisyTopK:
    """Noisy top-k gating (Shazeer et al. 2017): ``noisy_top_k``, noise only in training.

    Reads 2E router columns: the E logits, then E noise logits (their weights start at zero,
    a noise scale of softplus(0) = 0.69). The paper balances with importance and load losses;
    here the Switch loss (alpha = 1e-2) stands in for them.
    """

    k: int = 2
    balance_count: str = "first"
    dynamic_coef: float = 0.0
    name: ClassVar[str] = "noisy_top_k"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        _check_recipe(self)

    def check_experts(self, num_experts: int) -> None:
        check_int("k", self.k, 1, num_experts)

    def router_columns(self, num_experts: int) -> int:
        return 2 * num_experts

    def __call__(self, logits: Tensor, *, training: bool, seq_len: int | None = None) -> Routing:
        clean, noise = logits.chunk(2, dim=1)  # (T, E) each
        return noisy_top_k(clean, noise, self.k, training=training)


@dataclass(frozen=True)
class TopP:
    """Top-P dynamic routing (Huang et al. 2024): ``top_p``, the same rule in training and eval.

    Paper recipe: L = L_task + 1e-2 L_b + 1e-4 L_d, L_b counting every selected expert
    (``balance_count="selected"``), L_d the router entropy (beta = ``dynamic_coef``); no z-loss.
    """

    p: float = 0.4
    rule: str = "paper"  # "paper" (cumsum >= p) | "code" (official release: > p)
    max_experts: int | None = None  # our addition: cap on experts per token
    balance_count: str = "selected"
    dynamic_coef: float = 1e-4
    name: ClassVar[str] = "top_p"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_float("p", self.p, 0.0, 1.0, low_open=True)
        check_choice("rule", self.rule, ("paper", "code"))
        if self.max_experts is not None:
            check_int("max_experts", self.max_experts, 1)
        _check_recipe(self)

    def __call__(self, logits: Tensor, *, training: bool, seq_len: int | None = None) -> Routing:
        return top_p(logits, self.p, rule=self.rule, max_experts=self.max_experts)


@dataclass(frozen=True)
class Adaptive:
    """Adaptive gating (Li et al., EMNLP 2023): ``adaptive``, one or two experts per token.

    Paper recipe: balance loss on the top-1 decisions (``balance_count="first"``), 1e-2; no
    capacity limit; no z-loss.
    """

    threshold: float = 0.1
    gap: str = "raw"  # "raw" p1 - p2 | "normalized" (p1 - p2) / (p1 + p2)
    renormalize: bool = False
    balance_count: str = "first"
    dynamic_coef: float = 0.0
    name: ClassVar[str] = "adaptive"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_float("threshold", self.threshold, 0.0, 1.0)
        check_choice("gap", self.gap, ("raw", "normalized"))
        check_bool("renormalize", self.renormalize)
        _check_recipe(self)

    def __call__(self, logits: Tensor, *, training: bool, seq_len: int | None = None) -> Routing:
        return adaptive(logits, self.threshold, gap=self.gap, renormalize=self.renormalize)


@dataclass(frozen=True)
class GWBroadcast:
    """GW-MoE (Wu et al. 2024): ``base`` routing, uncertain tokens broadcast in training only.

    The loss recipe (how L_b counts, beta) is the base router's. The released code fine-tunes
    with the router frozen, z-loss 0 and the aux loss at 1e-3 (``paper_losses``); freezing is
    the trainer's switch (``TrainConfig.freeze_router``).
    """

    base: Router = TopK()
    threshold: float = 0.75
    measure: str = "normalized_entropy"  # or "entropy" (nats), as the released code
    max_slots: int | None = None  # broadcast tokens per sequence, first tokens first
    name: ClassVar[str] = "gw"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-3, "z_coef": 0.0}

    def __post_init__(self) -> None:
        if not callable(self.base) or isinstance(self.base, type):
            raise TypeError(
                f"base must be a router instance (e.g. TopK(k=2)), got base={self.base!r}"
            )
        if isinstance(self.base, GWBroadcast):
            raise TypeError("base must not itself be a GWBroadcast")
        check_threshold(self.threshold, self.measure, None)
        if self.max_slots is not None:
            check_int("max_slots", self.max_slots, 0)

    @property
    def balance_count(self) -> str:
        return getattr(self.base, "balance_count", "first")

    @property
    def dynamic_coef(self) -> float:
        return getattr(self.base, "dynamic_coef", 0.0)

    def router_columns(self, num_experts: int) -> int:
        return router_columns(self.base, num_experts)

    def check_experts(self, num_experts: int) -> None:
        check_threshold(self.threshold, self.measure, num_experts)
        check_experts(self.base, num_experts)

    def __call__(self, logits: Tensor, *, training: bool, seq_len: int | None = None) -> Routing:
        base = self.base(logits, training=training, seq_len=seq_len)
        return gw_broadcast(
            base,
            self.threshold,
            measure=self.measure,
            max_slots=self.max_slots,
            seq_len=seq_len,
            training=training,
        )


def router_columns(router: Router, num_experts: int) -> int:
    """How many router outputs ``router`` reads (E unless it says otherwise)."""
    hook = getattr(router, "router_columns", None)
    return num_experts if hook is None else hook(num_experts)


def check_experts(router: Router, num_experts: int) -> None:
    """Let the router refuse settings that do not fit ``num_experts`` (its optional hook)."""
    hook = getattr(router, "check_experts", None)
    if hook is not None:
        hook(num_experts)


# ---- names: only for the command line, configs on disk and cached results -------------------

ROUTERS: dict[str, type] = {cls.name: cls for cls in (TopK, NoisyTopK, TopP, Adaptive, GWBroadcast)}


def router_from_name(name: str, **settings: Any) -> Router:
    """``router_from_name("top_p", p=0.4)`` -> ``TopP(p=0.4)``; unknown names list the choices."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {sorted(ROUTERS)}")
    cls = ROUTERS[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"router {name!r} has no setting {unknown}; its settings: {sorted(known)}")
    return cls(**settings)


def router_to_dict(router: Router) -> dict[str, Any]:
    """A registered spec as plain data: ``{"name": "top_p", "p": 0.4, ...}`` (nested for GW)."""
    cls = type(router)
    if ROUTERS.get(getattr(cls, "name", None)) is not cls:
        raise TypeError(
            f"only the registered routers {sorted(ROUTERS)} can be written as data, "
            f"got {cls.__name__}: keep its code beside the saved weights"
        )
    out: dict[str, Any] = {"name": cls.name}
    for f in fields(router):
        value = getattr(router, f.name)
        out[f.name] = router_to_dict(value) if f.name == "base" else value
    return out


def router_from_dict(data: dict[str, Any]) -> Router:
    """Inverse of ``router_to_dict``."""
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"a router as data is a dict with a 'name', got {data!r}")
    settings = {k: v for k, v in data.items() if k != "name"}
    if "base" in settings:
        settings["base"] = router_from_dict(settings["base"])
    return router_from_name(data["name"], **settings)

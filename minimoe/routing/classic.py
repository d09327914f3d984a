"""The routers of the course's first chapters, each a pure function and a frozen spec.

Top-K (Shazeer 2017, GShard, Switch, Mixtral), noisy top-k (Shazeer 2017), Top-P (Huang et al.
2024), adaptive gating (Li et al. 2023) and GW-MoE broadcast (Wu et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from minimoe.checks import check_bool, check_choice, check_float, check_int
from minimoe.routing import flags
from minimoe.routing.core import (
    UNCERTAINTY,
    Router,
    Routing,
    _from_mask,
    _mask_of_top,
    _uncertainty,
    check_experts,
    check_jitter,
    check_logits,
    check_recipe,
    check_threshold,
    resolve_renormalize,
    router_columns,
    top_expert,
)

TOP_P_RULES = ("paper", "code")
GAPS = ("raw", "normalized")

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
    check_choice("rule", rule, TOP_P_RULES)
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
    check_choice("gap", gap, GAPS)
    check_bool("renormalize", renormalize)
    probs = logits.softmax(dim=-1)  # (T, E)
    first = top_expert(probs)[:, None]  # (T, 1)
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, first, True)
    if probs.shape[1] >= 2:
        second = top_expert(probs.scatter(1, first, -1.0))[:, None]  # (T, 1) the runner-up
        p1, p2 = probs.gather(1, first).squeeze(1), probs.gather(1, second).squeeze(1)  # (T,)
        diff = p1 - p2 if gap == "raw" else (p1 - p2) / (p1 + p2)
        # threshold 0 is exact top-1 (a tie of p1 = p2 included); threshold 1 always sends to both
        two = (diff <= threshold) if threshold > 0 else torch.zeros_like(diff, dtype=torch.bool)
        mask.scatter_(1, second, two[:, None])
    return _from_mask(logits, probs, mask, renormalize)


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


@dataclass(frozen=True)
class TopK:
    """Top-K (Mixtral: ``renormalize=True``; Switch: ``k=1, renormalize=False``): ``top_k``.

    Paper recipe: Switch balance loss on first choices, alpha = 1e-2; no z-loss (ST-MoE added it).
    """

    k: int = field(default=2, metadata=flags.K)
    # None: True, with a warning at k=1 (no router gradient)
    renormalize: bool | None = field(default=None, metadata=flags.RENORMALIZE)
    input_jitter: float = field(default=0.0, metadata=flags.INPUT_JITTER)  # Mixtral's
    jitter_experts: bool = field(default=True, metadata=flags.JITTER_EXPERTS)
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "top_k"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        resolve_renormalize(self)
        check_jitter(self)
        check_recipe(self)

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

    k: int = field(default=2, metadata=flags.K)
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "noisy_top_k"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        check_recipe(self)

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

    p: float = field(
        default=0.4,
        metadata={"flag": "top_p", "help": "cumulative probability to reach", "positive": True},
    )
    rule: str = field(
        default="paper",
        metadata={
            "flag": "top_p_rule",
            "help": "paper: cumsum >= p; code: > p, as the official release",
            "choices": TOP_P_RULES,
        },
    )
    max_experts: int | None = field(default=None, metadata=flags.MAX_EXPERTS)  # our addition
    balance_count: str = field(default="selected", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=1e-4, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "top_p"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_float("p", self.p, 0.0, 1.0, low_open=True)
        check_choice("rule", self.rule, TOP_P_RULES)
        if self.max_experts is not None:
            check_int("max_experts", self.max_experts, 1)
        check_recipe(self)

    def __call__(self, logits: Tensor, *, training: bool, seq_len: int | None = None) -> Routing:
        return top_p(logits, self.p, rule=self.rule, max_experts=self.max_experts)


@dataclass(frozen=True)
class Adaptive:
    """Adaptive gating (Li et al., EMNLP 2023): ``adaptive``, one or two experts per token.

    Paper recipe: balance loss on the top-1 decisions (``balance_count="first"``), 1e-2; no
    capacity limit; no z-loss.
    """

    threshold: float = field(
        default=0.1,
        metadata={
            "flag": "adaptive_threshold",
            "help": "largest top-1/top-2 gap that sends a token to two experts",
        },
    )
    gap: str = field(
        default="raw",
        metadata={
            "flag": "adaptive_gap",
            "help": "raw: p1 - p2; normalized: (p1 - p2) / (p1 + p2)",
            "choices": GAPS,
        },
    )
    renormalize: bool = field(default=False, metadata=flags.RENORMALIZE)
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "adaptive"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_float("threshold", self.threshold, 0.0, 1.0)
        check_choice("gap", self.gap, GAPS)
        check_bool("renormalize", self.renormalize)
        check_recipe(self)

    def __call__(self, logits: Tensor, *, training: bool, seq_len: int | None = None) -> Routing:
        return adaptive(logits, self.threshold, gap=self.gap, renormalize=self.renormalize)


@dataclass(frozen=True)
class GWBroadcast:
    """GW-MoE (Wu et al. 2024): ``base`` routing, uncertain tokens broadcast in training only.

    The loss recipe (how L_b counts, beta) is the base router's. The released code fine-tunes
    with the router frozen, z-loss 0 and the aux loss at 1e-3 (``paper_losses``); freezing is
    the trainer's switch (``TrainConfig.freeze_router``).
    """

    # the command line builds it as --router top_k with --k
    base: Router = field(default=TopK(), metadata={"base": "top_k", "base_flags": ("k",)})
    threshold: float = field(
        default=0.75,
        metadata={"flag": "gw_threshold", "help": "uncertainty at which a token is broadcast"},
    )
    measure: str = field(
        default="normalized_entropy",
        metadata={
            "flag": "gw_measure",
            "help": "uncertainty measure; entropy in nats, as the released code",
            "choices": tuple(UNCERTAINTY),
        },
    )
    max_slots: int | None = field(
        default=None,
        metadata={"flag": "gw_max_slots", "help": "broadcast tokens per sequence, the first ones"},
    )
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

    # the base's input jitter, which the layer applies (minimoe.routing: the router interface)
    @property
    def input_jitter(self) -> float:
        return getattr(self.base, "input_jitter", 0.0)

    @property
    def jitter_experts(self) -> bool:
        return getattr(self.base, "jitter_experts", True)

    @property
    def jitter_draws(self) -> int:
        return getattr(self.base, "jitter_draws", 1)

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

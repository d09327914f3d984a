"""Routing: from router logits to one decision object.

Every routing method is a small pure function ``logits (T, E) -> Routing`` (or
``Routing -> Routing`` for GW broadcast). A Routing says, for each token, which experts it
goes to (``mask``) and with which combine weights (``weights``), next to the full softmax
(``probs``) that losses and uncertainty measures need. Dispatch knows nothing of how the
decision was made; this file knows nothing of dispatch.

Notation (see PAPERS.md): T tokens, E experts, P = softmax(logits) in float32, S the
set of experts a token is sent to, y = sum_{i in S} g_i * Expert_i(x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Routing",
    "ROUTERS",
    "adaptive",
    "entropy",
    "gw_broadcast",
    "is_uncertain",
    "noisy_top_k",
    "normalized_entropy",
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
    broadcast: (T,) bool, tokens sent to every expert by GW broadcast (all False otherwise).
    """

    logits: Tensor
    probs: Tensor
    mask: Tensor
    weights: Tensor
    broadcast: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[0]

    @property
    def num_experts(self) -> int:
        return self.mask.shape[1]

    @property
    def experts_per_token(self) -> Tensor:
        """(T,) how many experts each token is sent to."""
        return self.mask.sum(dim=1)

    @property
    def tokens_per_expert(self) -> Tensor:
        """(E,) how many tokens each expert receives."""
        return self.mask.sum(dim=0)


def check_logits(logits: Tensor) -> Tensor:
    """Validate router logits and return them as float32 (the router runs in float32)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (tokens, experts), got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")
    if logits.numel() and not torch.isfinite(logits).all():
        bad = logits[~torch.isfinite(logits)].flatten()[0].item()
        raise ValueError(f"logits must be finite, found {bad}")
    return logits.float()


def _check_k(k: int, num_experts: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got k={k}")


def _from_mask(logits: Tensor, probs: Tensor, mask: Tensor, renormalize: bool) -> Routing:
    """Combine weights = probs on the mask, optionally renormalized over the selected set."""
    weights = probs * mask  # exactly 0 outside S
    if renormalize:
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return Routing(logits=logits, probs=probs, mask=mask, weights=weights)


def _mask_of_top(scores: Tensor, k: int) -> Tensor:
    """(T, E) bool mask of the k largest scores per row (exact ties: whichever torch.topk returns)."""
    idx = scores.topk(k, dim=1).indices  # (T, k)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def top_k(logits: Tensor, k: int = 2, renormalize: bool = True) -> Routing:
    """Top-K routing (Shazeer 2017, GShard, Mixtral, Switch).

    P = softmax(logits) in float32; S = the k largest P_i.
    Mixtral (``renormalize=True``): g_i = P_i / sum_{j in S} P_j.
    Switch (k=1, ``renormalize=False``): g_i = P_i, so the router still gets a gradient.
    Softmax first, then top-k: taking the softmax over the top-k logits instead would give
    top-1 a constant weight of 1 and no gradient.
    """
    logits = check_logits(logits)
    _check_k(k, logits.shape[1])
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
    _check_k(k, logits.shape[1])
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
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p p must be in (0, 1], got p={p!r}")
    if rule not in ("paper", "code"):
        raise ValueError(f"top_p rule must be 'paper' or 'code', got rule={rule!r}")
    num_experts = logits.shape[1]
    if max_experts is not None and (
        isinstance(max_experts, bool) or not isinstance(max_experts, int) or max_experts < 1
    ):
        raise ValueError(f"max_experts must be an int >= 1 or None, got max_experts={max_experts!r}")
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
    within ``threshold`` the token goes to both, otherwise to i alone.
    ``gap="raw"`` (default): R_i - R_j on the softmax values, the rule as written, on the
    same probabilities that are the weights (Eq. 3); softmax is the normalization, and no
    step the paper leaves undefined is added. ``gap="normalized"``: (R_i - R_j) / (R_i + R_j),
    our reading of "normalizes the expert probability": scale-free, and never smaller than
    the raw gap (R_i + R_j <= 1), so at the same T it sends at most as many tokens to two
    experts (as many when R_i + R_j = 1).
    Weights are the softmax values (Eq. 3); ``renormalize=True`` rescales them over S.
    """
    logits = check_logits(logits)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"adaptive threshold must be in [0, 1], got threshold={threshold!r}")
    if gap not in ("raw", "normalized"):
        raise ValueError(f"adaptive gap must be 'raw' or 'normalized', got gap={gap!r}")
    num_experts = logits.shape[1]
    probs = logits.softmax(dim=-1)  # (T, E)
    k = min(2, num_experts)
    top = probs.topk(k, dim=1)  # values (T, k), indices (T, k)
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top.indices[:, :1], True)
    if k == 2:
        p1, p2 = top.values[:, 0], top.values[:, 1]
        diff = p1 - p2 if gap == "raw" else (p1 - p2) / (p1 + p2)
        # threshold 0 is exact top-1; threshold 1 always sends to both (diff <= 1)
        two = (diff <= threshold) if threshold > 0 else torch.zeros_like(diff, dtype=torch.bool)
        mask.scatter_(1, top.indices[:, 1:], two[:, None])
    return _from_mask(logits, probs, mask, renormalize)


# ---- uncertainty measures -------------------------------------------------------------


def entropy(probs: Tensor) -> Tensor:
    """H(P) = -sum_i P_i log P_i in nats, per row: (..., E) -> (...). 0 <= H <= ln E."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)


def normalized_entropy(probs: Tensor) -> Tensor:
    """H(P) / ln E in [0, 1]: 0 for a one-hot router, 1 for a uniform one."""
    num_experts = probs.shape[-1]
    if num_experts < 2:
        return torch.zeros(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    return entropy(probs) / math.log(num_experts)


def top_gap(probs: Tensor) -> Tensor:
    """p1 - p2, the margin between the two most likely experts: (..., E) -> (...)."""
    if probs.shape[-1] < 2:
        return torch.ones(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


UNCERTAINTY = {"entropy": entropy, "normalized_entropy": normalized_entropy}


def uncertainty(probs: Tensor, measure: str = "normalized_entropy") -> Tensor:
    """Per-token uncertainty by name: ``entropy`` (nats, in [0, ln E]) or ``normalized_entropy``."""
    if measure not in UNCERTAINTY:
        raise ValueError(f"unknown uncertainty measure {measure!r}; choose from {sorted(UNCERTAINTY)}")
    return UNCERTAINTY[measure](probs)


def is_uncertain(probs: Tensor, threshold: float, measure: str = "normalized_entropy") -> Tensor:
    """(T,) bool: uncertainty(probs, measure) >= threshold, GW-MoE's rule for broadcasting.

    float32 rounding puts a uniform router's entropy a hair below ln E: the 1e-6 allowance
    keeps perfectly uncertain tokens uncertain at the maximum threshold.
    """
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
    ``seq_len`` the whole batch counts as one sequence.
    """
    if measure not in UNCERTAINTY:
        raise ValueError(f"unknown uncertainty measure {measure!r}; choose from {sorted(UNCERTAINTY)}")
    upper = math.log(routing.num_experts) if measure == "entropy" else 1.0
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= upper:
        raise ValueError(f"gw threshold for {measure} must be in [0, {upper:.4g}], got threshold={threshold!r}")
    if max_slots is not None and (isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots < 0):
        raise ValueError(f"max_slots must be a non-negative int or None, got max_slots={max_slots!r}")
    num_tokens = routing.num_tokens
    if seq_len is not None and num_tokens and (seq_len < 1 or num_tokens % seq_len):
        raise ValueError(f"seq_len={seq_len} does not divide the number of tokens {num_tokens}")
    if not training:
        return routing
    chosen = is_uncertain(routing.probs, threshold, measure)  # (T,)
    if max_slots is not None and num_tokens:
        per_seq = chosen.view(-1, seq_len or num_tokens)  # (B, L)
        chosen = (per_seq & (per_seq.cumsum(dim=1) <= max_slots)).view(-1)  # first tokens first
    mask = routing.mask | chosen[:, None]
    weights = torch.where(chosen[:, None], routing.probs, routing.weights)
    return replace(routing, mask=mask, weights=weights, broadcast=chosen)


# name -> function, for configs and the command line
ROUTERS = {"top_k": top_k, "noisy_top_k": noisy_top_k, "top_p": top_p, "adaptive": adaptive}

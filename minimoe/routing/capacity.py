"""Capacity inside the router, the rule of Switch (top-1) and NLLB-MoE (top-2), the only Hugging
Face families that drop tokens: a fixed number of slots per expert, and the weights follow the
drops. (minimoe's layer-level ``capacity_factor`` drops after routing, for any router.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from minimoe.checks import check_bool, check_choice, check_float, check_int
from minimoe.routing import flags
from minimoe.routing.core import (
    Routing,
    _mask_of_top,
    check_jitter,
    check_logits,
    check_recipe,
)

NORMALIZE = ("none", "before_drop", "after_drop")
SECOND_EXPERT = ("all", "sampling", "random")


def _second_choice(
    logits: Tensor, probs: Tensor, first: Tensor, second: str, normalized: bool
) -> tuple[Tensor, Tensor]:
    """(T, E) masks of NLLB-MoE's second choice before and after its policy ``second``: the best
    logit after the first (``"sampling"``: of the logits plus Gumbel noise), kept always, or
    (``"random"``) with probability min(1, 2 g), g its weight before the drops (``normalized``:
    P_2 / (P_1 + P_2), else P_2), as fairseq's ``top2gating``. Drawn as Hugging Face draws
    (torch's global generator; the Gumbel noise on the CPU, as ``torch.distributions`` does)."""
    if second == "sampling":
        gumbel = torch.distributions.gumbel.Gumbel(0, 1).rsample(logits.shape)  # (T, E)
        logits = logits + gumbel.to(logits.device)
    experts = torch.arange(logits.shape[1], device=logits.device)
    chosen = logits.masked_fill(first, float("-inf")).argmax(dim=1, keepdim=True) == experts
    if second != "random":
        return chosen, chosen
    g = (probs * chosen).sum(dim=1)  # (T,)
    if normalized:
        g = g / ((probs * first).sum(dim=1) + g).clamp_min(torch.finfo(g.dtype).eps)
    return chosen, chosen & (2 * g > torch.rand_like(g))[:, None]


def _slots(pairs: Tensor, order: Tensor | None) -> Tensor:
    """(S, L, E) long: each pair's slot at its expert, counted along L (in ``order``'s order)."""
    if order is None:
        return pairs.cumsum(dim=1) - 1
    rows = order[..., None].expand_as(pairs)  # (S, L, E)
    slots = pairs.gather(1, rows).cumsum(dim=1) - 1  # counted in priority order
    return slots.gather(1, order.argsort(dim=1)[..., None].expand_as(pairs))  # back in place


def capacity_top_k(
    logits: Tensor,
    k: int = 2,
    capacity: int = 1,
    seq_len: int | None = None,
    normalize: str = "after_drop",
    second: str = "all",
    prioritized: bool = False,
) -> Routing:
    """Top-k of the softmax with a fixed number of slots per expert, counted inside the router.

    Slots go to first choices before second choices, earlier tokens first (GShard; Switch and
    NLLB-MoE count this way), per sequence of ``seq_len`` tokens (Switch) or over all T (NLLB);
    ``prioritized`` (NLLB's ``batch_prioritized_routing``): the tokens with the highest top
    probability first instead. Pairs past ``capacity`` are dropped: their weight is 0 and the
    residual carries the token. g = P on the kept pairs; ``normalize``: ``"none"`` (Switch:
    g = P_max), ``"before_drop"`` (g_i = P_i / sum of the k chosen, before dropping) or
    ``"after_drop"`` (over the kept ones: a token that lost its second expert gets g = 1 on the
    first; NLLB-MoE's default).

    ``second`` (k = 2 only), NLLB-MoE's second-expert policy, in training and evaluation alike:
    ``"all"`` sends every token to its second choice; ``"sampling"`` takes the best logit after
    the first with Gumbel noise added (its weight is still its P); ``"random"`` drops the second
    unless 2 g > u ~ U(0, 1), g its weight before the drops, before the slots are counted
    (normalized before the drops, it still counts in the sum), as fairseq's ``top2gating``. The
    draws are Hugging Face's: under one seed the same choices.
    """
    logits = check_logits(logits)
    T, E = logits.shape
    check_int("k", k, 1, E)
    check_int("capacity", capacity, 0)
    check_choice("normalize", normalize, NORMALIZE)
    check_choice("second", second, SECOND_EXPERT)
    check_bool("prioritized", prioritized)
    if second != "all" and k != 2:
        raise ValueError(
            f"second={second!r} is a policy for the second expert: it needs k=2, got k={k}"
        )
    probs = logits.softmax(dim=-1)  # (T, E)
    first = probs.argmax(dim=1, keepdim=True) == torch.arange(E, device=probs.device)  # (T, E)
    if second == "all":
        chosen = _mask_of_top(probs, k)
        first, sent = first & chosen, chosen
    else:
        before = normalize == "before_drop"
        picked, kept_second = _second_choice(logits, probs, first, second, before)
        chosen, sent = first | picked, first | kept_second
    L = seq_len or max(T, 1)
    if T % L:
        raise ValueError(f"seq_len={seq_len} does not divide the {T} tokens")
    seqs = T // L
    # slot of each pair within its sequence: first choices, then second choices
    firsts = first.view(seqs, L, E).long()
    seconds = (sent & ~first).view(seqs, L, E).long()
    # HF's order: argsort of -max P (over all T when L = T)
    order = (-1 * probs.max(dim=1)[0]).view(seqs, L).argsort(dim=1) if prioritized else None
    slot1 = _slots(firsts, order)
    slot2 = _slots(seconds, order) + firsts.sum(dim=1, keepdim=True)
    kept = ((firsts.bool() & (slot1 < capacity)) | (seconds.bool() & (slot2 < capacity))).view(T, E)
    g = probs * chosen
    eps = torch.finfo(g.dtype).eps  # NLLB clamps the sum: a token that lost both keeps g = 0
    if normalize == "before_drop":
        g = g / g.sum(dim=1, keepdim=True).clamp_min(eps)
    g = g * kept
    if normalize == "after_drop":
        g = g / g.sum(dim=1, keepdim=True).clamp_min(eps)
    return Routing(logits=logits, probs=probs, mask=kept, weights=g)


@dataclass(frozen=True)
class CapacityTopK:
    """Switch (``k=1, normalize="none", per_sequence=True``) and NLLB-MoE's top-2 router:
    ``capacity_top_k`` with ``expert_capacity`` slots (None: k * ceil(T / E), NLLB's default);
    at evaluation ``eval_capacity_fraction`` f > 0 gives ceil(f * T) slots instead (NLLB).

    Only these two Hugging Face families drop tokens (only Switch's code adds a router z-loss);
    the recipe here is Switch's alpha = 1e-2 with ST-MoE's z-loss 1e-3. NLLB-MoE's
    ``second_expert_policy`` is ``second_expert``, its ``batch_prioritized_routing``
    ``batch_prioritized``; its router drops padding tokens before counting slots, which a rule
    over logits does not see (``MoE.forward(mask=...)`` routes every position, then drops the
    padding). ``input_jitter``: Switch's ``router_jitter_noise`` (in training the router reads
    its tokens times U(1 - eps, 1 + eps); ``jitter_experts=False``: the router alone, as the
    Switch paper has it).
    """

    k: int = field(default=2, metadata=flags.K)
    expert_capacity: int | None = field(
        default=None, metadata={"help": "slots per expert; not given: k ceil(T / E)"}
    )
    eval_capacity_fraction: float = field(
        default=0.0, metadata={"help": "f > 0: ceil(f T) slots per expert at evaluation"}
    )
    per_sequence: bool = field(
        default=False,
        metadata={
            "flag": "capacity_per_sequence",
            "help": "count the slots per sequence, as Switch",
        },
    )
    normalize: str = field(
        default="after_drop",
        metadata={
            "flag": "capacity_normalize",
            "help": "weights normalized over the chosen experts: not, before or after the drops",
            "choices": NORMALIZE,
        },
    )
    second_expert: str = field(
        default="all",
        metadata={
            "help": "top-2: the second expert always, sampled (Gumbel) or kept at random (NLLB-MoE)",
            "choices": SECOND_EXPERT,
        },
    )
    batch_prioritized: bool = field(
        default=False,
        metadata={"help": "slots to the tokens with the highest top probability first (NLLB-MoE)"},
    )
    input_jitter: float = field(default=0.0, metadata=flags.INPUT_JITTER)
    jitter_experts: bool = field(default=True, metadata=flags.JITTER_EXPERTS)
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "capacity_top_k"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 1e-3}

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        if self.expert_capacity is not None:
            check_int("expert_capacity", self.expert_capacity, 0)
        check_float("eval_capacity_fraction", self.eval_capacity_fraction, 0.0)
        check_bool("per_sequence", self.per_sequence)
        check_choice("normalize", self.normalize, NORMALIZE)
        check_choice("second_expert", self.second_expert, SECOND_EXPERT)
        check_bool("batch_prioritized", self.batch_prioritized)
        if self.second_expert != "all" and self.k != 2:
            raise ValueError(
                f"second_expert={self.second_expert!r} is a policy for the second expert: it "
                f"needs k=2, got k={self.k}"
            )
        check_jitter(self)
        check_recipe(self)

    def check_experts(self, num_experts: int) -> None:
        check_int("k", self.k, 1, num_experts)

    def capacity(self, num_tokens: int, num_experts: int, training: bool) -> int:
        """Slots per expert for ``num_tokens`` tokens (per sequence when ``per_sequence``)."""
        if not training and self.eval_capacity_fraction > 0:
            return math.ceil(self.eval_capacity_fraction * num_tokens)
        if self.expert_capacity is not None:
            return self.expert_capacity
        return self.k * math.ceil(num_tokens / num_experts)

    def __call__(self, logits: Tensor, *, training: bool, seq_len: int | None = None) -> Routing:
        L = seq_len if self.per_sequence and seq_len else logits.shape[0]
        return capacity_top_k(
            logits,
            self.k,
            self.capacity(L, logits.shape[1], training),
            seq_len=L,
            normalize=self.normalize,
            second=self.second_expert,
            prioritized=self.batch_prioritized,
        )

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


def capacity_top_k(
    logits: Tensor,
    k: int = 2,
    capacity: int = 1,
    seq_len: int | None = None,
    normalize: str = "after_drop",
) -> Routing:
    """Top-k of the softmax with a fixed number of slots per expert, counted inside the router.

    Slots go to first choices before second choices, earlier tokens first (GShard; Switch and
    NLLB-MoE count this way), per sequence of ``seq_len`` tokens (Switch) or over all T (NLLB).
    Pairs past ``capacity`` are dropped: their weight is 0 and the residual carries the token.
    g = P on the kept pairs; ``normalize``: ``"none"`` (Switch: g = P_max), ``"before_drop"``
    (g_i = P_i / sum of the k chosen, before dropping) or ``"after_drop"`` (over the kept ones:
    a token that lost its second expert gets g = 1 on the first; NLLB-MoE's default).
    """
    logits = check_logits(logits)
    T, E = logits.shape
    check_int("k", k, 1, E)
    check_int("capacity", capacity, 0)
    check_choice("normalize", normalize, NORMALIZE)
    probs = logits.softmax(dim=-1)  # (T, E)
    chosen = _mask_of_top(probs, k)
    L = seq_len or max(T, 1)
    if T % L:
        raise ValueError(f"seq_len={seq_len} does not divide the {T} tokens")
    first = (probs.argmax(dim=1, keepdim=True) == torch.arange(E, device=probs.device)) & chosen
    seqs = T // L
    # slot of each pair within its sequence: first choices in token order, then second choices
    firsts = first.view(seqs, L, E).long()
    seconds = (chosen & ~first).view(seqs, L, E).long()
    slot1 = firsts.cumsum(dim=1) - 1
    slot2 = seconds.cumsum(dim=1) - 1 + firsts.sum(dim=1, keepdim=True)
    kept = ((firsts.bool() & (slot1 < capacity)) | (seconds.bool() & (slot2 < capacity))).view(T, E)
    g = probs * chosen
    if normalize == "before_drop":
        g = g / g.sum(dim=1, keepdim=True)
    g = g * kept
    if normalize == "after_drop":
        # NLLB clamps the sum at float32 eps: a token that lost both experts keeps g = 0
        g = g / g.sum(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).eps)
    return Routing(logits=logits, probs=probs, mask=kept, weights=g)


@dataclass(frozen=True)
class CapacityTopK:
    """Switch (``k=1, normalize="none", per_sequence=True``) and NLLB-MoE's top-2 router:
    ``capacity_top_k`` with ``expert_capacity`` slots (None: k * ceil(T / E), NLLB's default);
    at evaluation ``eval_capacity_fraction`` f > 0 gives ceil(f * T) slots instead (NLLB).

    Only these two Hugging Face families drop tokens (only Switch's code adds a router z-loss);
    the recipe here is Switch's alpha = 1e-2 with ST-MoE's z-loss 1e-3. ``input_jitter``: Switch's
    ``router_jitter_noise`` (in training the router reads its tokens times U(1 - eps, 1 + eps);
    ``jitter_experts=False``: the router alone, as the Switch paper has it).
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
        )

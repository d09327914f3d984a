"""Compute on demand: routers whose experts per token vary from token to token.

ReMoE (a ReLU gate steered to a sparsity target), expert threshold routing (each expert's running
score threshold) and SeqTopK (the top-k budget spent per sequence). Same interface as the other
routers (``minimoe.routing``): a pure function on logits that returns a Routing, and a frozen
spec that checks its settings, keeps its state and carries its paper's loss recipe. None of them
has a fixed ``k``: their field ``experts_per_token`` is the mean they aim at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from minimoe.checks import check_bool, check_float, check_int
from minimoe.routing import flags
from minimoe.routing.core import Routing, _from_mask, _mask_of_top, check_logits, check_recipe

# a multiplied coefficient stays in float32's normal range, so that it can always come back
_L1_RANGE = (torch.finfo(torch.float32).tiny, 1e30)


# ---- ReMoE: a ReLU gate and an adaptive L1 penalty -----------------------------------------


def relu_routing(logits: Tensor) -> Routing:
    """ReMoE's router (Wang et al., ICLR 2025, arXiv 2412.14711): g = ReLU(logits), S = {i : g_i > 0}.

    No softmax and no top-k: a token uses every expert whose gate is positive, with weight g_i
    (not renormalized), so the number of experts varies and the gate is continuous. A token with
    no positive gate uses no expert (the layer counts it in ``unrouted_tokens``). ``probs`` is
    softmax(logits), for the losses and uncertainty measures that need a distribution.
    """
    logits = check_logits(logits)
    gates = torch.relu(logits)  # (T, E)
    return Routing(logits=logits, probs=logits.softmax(dim=-1), mask=gates > 0, weights=gates)


def relu_l1_loss(gates: Tensor, mask: Tensor, experts_per_token: float | None = None) -> Tensor:
    """ReMoE's sparsity penalty L_reg = (1/T) sum_t sum_i f_i g_ti over one layer's T tokens.

    Load balanced (``experts_per_token`` k given): f_i = E / (k T) #{t : g_ti > 0}, counted without
    gradient, so busy experts' gates are pushed down harder (the official code computes it with
    Megatron's Switch balance loss, the gates in place of the probabilities). ``None``: f_i = 1,
    the plain L1 norm of the gates.
    """
    T, E = gates.shape
    if T == 0:
        return gates.new_zeros(())
    per_expert = gates.mean(dim=0)  # (E,) mean gate: the only gradient path
    if experts_per_token is None:
        return per_expert.sum()
    f = mask.to(gates.dtype).sum(dim=0) * (E / (experts_per_token * T))  # (E,)
    return (f * per_expert).sum()


@dataclass(frozen=True)
class ReMoE:
    """ReMoE (Wang et al., ICLR 2025, arXiv 2412.14711): ``relu_routing`` plus lambda * L_reg.

    The coefficient lambda is router state (a buffer, no gradient) that starts at ``l1_init``
    (lambda_0 = 1e-8) and is multiplied after every optimizer step: by ``l1_multiplier`` (alpha =
    1.2) when the step's sparsity 1 - (experts per token) / E is below the target 1 - k/E, else
    divided by it. The layer adds lambda * L_reg (``relu_l1_loss``, reported as
    ``losses["l1_reg"]``) to its aux loss. Paper and official code (thu-ml/ReMoE, Megatron
    ``ReLURouter`` and ``training.py``) differ in two places, and we follow neither exactly:
    at exactly the target the paper's alpha^sign(target - S) keeps lambda and the code divides
    it (we follow the code); both keep one lambda for the whole model, updated from the sparsity
    averaged over all layers, where here each layer keeps and steers its own. Paper recipe: no
    other balance loss and no z-loss (the official ReLU router never applies the aux loss its
    scripts configure). ``load_balance=False`` is the paper's unbalanced L1 ablation.
    """

    experts_per_token: float = field(default=2.0, metadata=flags.TARGET)  # k: sparsity 1 - k/E
    l1_init: float = field(  # lambda_0
        default=1e-8, metadata={"help": "ReMoE's first L1 coefficient lambda_0", "positive": True}
    )
    l1_multiplier: float = field(  # alpha (1 freezes lambda)
        default=1.2, metadata={"help": "ReMoE's factor alpha on lambda per step", "positive": True}
    )
    load_balance: bool = field(
        default=True, metadata={"help": "ReMoE: weight the L1 penalty by each expert's load"}
    )
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "remoe"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 0.0, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_float("experts_per_token", self.experts_per_token, 0.0, low_open=True)
        check_float("l1_init", self.l1_init, _L1_RANGE[0], _L1_RANGE[1])
        check_float("l1_multiplier", self.l1_multiplier, 1.0)
        check_bool("load_balance", self.load_balance)
        check_recipe(self)

    def check_experts(self, num_experts: int) -> None:
        check_float("experts_per_token", self.experts_per_token, 0.0, num_experts, low_open=True)

    def init_state(self, num_experts: int) -> dict[str, Tensor]:
        return {"l1_coef": torch.tensor(self.l1_init)}

    def update_state(self, state: dict[str, Tensor], stats) -> None:
        """lambda *= alpha if the sparsity 1 - n/E is below 1 - k/E (n = this step's experts per
        token, i.e. n > k), else lambda /= alpha; on the device, no host sync."""
        coef = state["l1_coef"]
        denser = stats.experts_per_token.to(coef.device) > self.experts_per_token
        factor = torch.where(denser, self.l1_multiplier, 1.0 / self.l1_multiplier)
        coef.copy_((coef * factor).clamp(*_L1_RANGE))

    def aux_losses(self, routing: Routing, state: dict[str, Tensor]) -> dict[str, tuple]:
        k = self.experts_per_token if self.load_balance else None
        return {"l1_reg": (state["l1_coef"], relu_l1_loss(routing.weights, routing.mask, k))}

    def __call__(
        self,
        logits: Tensor,
        *,
        training: bool,
        seq_len: int | None = None,
        state: dict[str, Tensor] | None = None,
    ) -> Routing:
        return relu_routing(logits)


# ---- expert threshold routing: each expert's running cutoff ------------------------------------


def expert_cutoff(logits: Tensor, experts_per_token: float) -> Tensor:
    """(E,) the score each expert would cut at to take its share k/E of these T tokens: the C-th
    largest logit of its column, C = ceil(k T / E), which is expert choice's cutoff at capacity
    factor k. NaN for no tokens (nothing measured)."""
    T, E = logits.shape
    if T == 0:
        return logits.new_full((E,), float("nan"))
    capacity = min(T, max(1, math.ceil(experts_per_token * T / E)))  # C
    return logits.detach().topk(capacity, dim=0).values[capacity - 1]  # (E,)


def expert_threshold(logits: Tensor, threshold: Tensor, renormalize: bool = False) -> Routing:
    """Expert threshold routing (Sun et al. 2026, arXiv 2603.11535): S = {i : l_i >= c_i}.

    Each expert i has a threshold c_i on its logit (router state, ``ExpertThreshold``); a token
    goes to every expert it clears, reading nothing of the other tokens, so it is causal and its
    number of experts varies. g_i = sigmoid(l_i) on S, not renormalized (``renormalize=True``:
    divided by their sum). A token that clears no threshold gets no routed expert: its output is
    the shared expert's, or 0, and the layer counts it in ``unrouted_tokens``. ``probs`` is the
    sigmoid scores normalized over all experts.
    """
    logits = check_logits(logits)
    E = logits.shape[1]
    if not isinstance(threshold, Tensor) or threshold.shape != (E,):
        raise ValueError(f"threshold must be a tensor of shape ({E},), got {threshold!r}")
    check_bool("renormalize", renormalize)
    s = logits.sigmoid()  # (T, E)
    mask = logits.detach() >= threshold.to(logits.dtype)  # a NaN threshold selects nobody
    weights = s * mask
    if renormalize:
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    return Routing(logits=logits, probs=s / s.sum(dim=1, keepdim=True), mask=mask, weights=weights)


@dataclass(frozen=True)
class ExpertThreshold:
    """Expert threshold routing (Sun et al. 2026, arXiv 2603.11535): ``expert_threshold`` with
    thresholds kept as router state and no balance loss.

    After every optimizer step each threshold moves toward the step's cutoff (``expert_cutoff``:
    the logit at which expert choice would give the expert its share k/E of the batch):
    c <- beta c + (1 - beta) cutoff, beta = ``ema_decay``; the first update takes the cutoff
    itself (the thresholds start at 0, a sigmoid score of 1/2). An expert that gets too many
    tokens sees its cutoff, and so its threshold, rise: balance without a loss. Evaluation routes
    with the stored thresholds only. ``warmup_steps``: training forwards route by the batch's own
    cutoffs (expert choice, not causal) until that many updates have been made, as the paper
    warms up with expert choice. Under expert parallelism the update reads every process's
    logits (``merge_measures``), so the thresholds move as in one process; the warm-up's
    routing cuts each process's own tokens. The paper's code was not found where we looked: the score
    (sigmoid, unnormalized weights) and the warm-up follow the paper as reviewers quote it, and
    the cutoff, beta and the first-update rule are our reading.
    """

    experts_per_token: float = field(default=2.0, metadata=flags.TARGET)  # k: shares k/E
    ema_decay: float = field(  # beta
        default=0.99, metadata={"help": "decay beta of the thresholds' running average"}
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "updates routed by the batch's cutoffs (expert choice) first"}
    )
    renormalize: bool = field(default=False, metadata=flags.RENORMALIZE)
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "expert_threshold"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 0.0, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_float("experts_per_token", self.experts_per_token, 0.0, low_open=True)
        check_float("ema_decay", self.ema_decay, 0.0, 1.0)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_bool("renormalize", self.renormalize)
        check_recipe(self)

    def check_experts(self, num_experts: int) -> None:
        check_float("experts_per_token", self.experts_per_token, 0.0, num_experts, low_open=True)

    def init_state(self, num_experts: int) -> dict[str, Tensor]:
        return {"threshold": torch.zeros(num_experts), "updates": torch.zeros((), dtype=torch.long)}

    def batch_measure(self, routing: Routing) -> Tensor:
        """The step's (T, E) logits, detached (a view, no copy): each expert's cutoff is an order
        statistic of its column over all of the step's tokens."""
        return routing.logits.detach()

    def merge_measures(self, parts: list[Tensor]) -> Tensor:
        """Every process's logits, in rank order: the tokens one process would have seen."""
        return torch.cat(parts)

    def update_state(self, state: dict[str, Tensor], stats) -> None:
        """c <- beta c + (1 - beta) cutoff (the cutoff itself at the first update), the cutoff
        ``expert_cutoff`` of the step's logits; a step that measured nothing (no tokens: NaN)
        leaves c as it is."""
        c = state["threshold"]
        cutoff = expert_cutoff(stats.router_measure, self.experts_per_token).to(c)
        moved = torch.where(
            state["updates"] == 0, cutoff, self.ema_decay * c + (1 - self.ema_decay) * cutoff
        )
        measured = ~torch.isnan(cutoff)
        c.copy_(torch.where(measured, moved, c))
        state["updates"] += measured.all().long()

    def __call__(
        self,
        logits: Tensor,
        *,
        training: bool,
        seq_len: int | None = None,
        state: dict[str, Tensor],
    ) -> Routing:
        threshold = state["threshold"]
        if training and self.warmup_steps:  # expert choice on this batch until warmed up
            warm = state["updates"] < self.warmup_steps
            threshold = torch.where(warm, expert_cutoff(logits, self.experts_per_token), threshold)
        return expert_threshold(logits, threshold, self.renormalize)


# ---- SeqTopK: the top-k budget spent per sequence ------------------------------------------


def seq_top_k(
    logits: Tensor,
    k: int = 2,
    seq_len: int | None = None,
    max_experts: int | None = None,
    min_experts: int = 0,
    renormalize: bool = True,
) -> Routing:
    """Sequence-level top-k (Wen et al. 2025, arXiv 2511.06494): L k selections per sequence.

    P = softmax(logits); in each sequence of L = ``seq_len`` tokens (None: all T tokens are one
    sequence; the rows are the (batch, seq_len) grid flattened row-major) S is the L k largest
    P_ti over all (token, expert) pairs, a token taking at most U = ``max_experts`` of them (its
    U best experts are its candidates; None: E) and at least ``min_experts`` (its best ones
    come first). So a sequence spends exactly what top-k spends, hard tokens more, easy ones
    fewer, possibly none (the layer counts those in ``unrouted_tokens``). Exact ties go to the
    earlier token, then the lower expert. g = P on S, renormalized over the token's S as top-k
    does (``renormalize``). Not causal: a token's experts depend on the later tokens of its
    sequence (the paper's online variant with an expert cache, for decoding, is not here).
    """
    logits = check_logits(logits)
    T, E = logits.shape
    check_int("k", k, 1, E)
    U = E if max_experts is None else check_int("max_experts", max_experts, k, E)
    check_int("min_experts", min_experts, 0, k)
    check_bool("renormalize", renormalize)
    L = T if seq_len is None else check_int("seq_len", seq_len, 1)
    if T and T % L:
        raise ValueError(f"seq_len={seq_len} does not divide the number of tokens {T}")
    probs = logits.softmax(dim=-1)  # (T, E)
    if T == 0:
        return _from_mask(logits, probs, torch.zeros_like(probs, dtype=torch.bool), renormalize)
    priority = probs.detach()  # selection only: no gradient through the choice
    if U < E:  # the pairs past a token's U best are never chosen (P >= 0 > -1)
        priority = priority.masked_fill(~_mask_of_top(priority, U), -1.0)
    if min_experts:  # a token's best min_experts come before every other pair (P <= 1 < 2)
        priority = priority + 2.0 * _mask_of_top(probs.detach(), min_experts)
    per_seq = priority.reshape(T // L, L * E)  # (B, L E) pairs token-major
    mask = _mask_of_top(per_seq, L * k).view(T, E)
    return _from_mask(logits, probs, mask, renormalize)


@dataclass(frozen=True)
class SeqTopK:
    """SeqTopK (Wen et al. 2025, arXiv 2511.06494): ``seq_top_k`` with the layer's sequence
    length, the same rule in training and evaluation.

    ``experts_per_token`` is the paper's K, spent over each sequence (T K selections); U =
    ``max_experts`` caps a token. The paper's code (Y-Research-SBU/SeqTopK) was not available
    to us; the cap and a token left with no expert follow the open Megatron-LM pull request
    #6208 (``min_experts=0``); ``min_experts=1`` keeps every token's best expert. Loss recipe:
    the top-k model it modifies (Switch balance loss, 1e-2).
    """

    experts_per_token: int = field(default=2, metadata={"flag": "k"} | flags.K)  # K
    max_experts: int | None = field(default=None, metadata=flags.MAX_EXPERTS)  # U (None: E)
    min_experts: int = field(default=0, metadata={"help": "experts every token keeps at least"})
    renormalize: bool = field(default=True, metadata=flags.RENORMALIZE)
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "seq_top_k"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_int("experts_per_token", self.experts_per_token, 1)
        if self.max_experts is not None:
            check_int("max_experts", self.max_experts, self.experts_per_token)
        check_int("min_experts", self.min_experts, 0, self.experts_per_token)
        check_bool("renormalize", self.renormalize)
        check_recipe(self)

    def check_experts(self, num_experts: int) -> None:
        check_int("experts_per_token", self.experts_per_token, 1, num_experts)
        if self.max_experts is not None:
            check_int("max_experts", self.max_experts, self.experts_per_token, num_experts)

    def __call__(self, logits: Tensor, *, training: bool, seq_len: int | None = None) -> Routing:
        return seq_top_k(
            logits,
            self.experts_per_token,
            seq_len=seq_len,
            max_experts=self.max_experts,
            min_experts=self.min_experts,
            renormalize=self.renormalize,
        )

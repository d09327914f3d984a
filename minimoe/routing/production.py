"""The routers of today's production MoEs: sigmoid scores with a selection bias balanced without
a loss (DeepSeek-V3, Wang et al. 2024), group-limited selection, and expert choice.

Same interface as the classic routers (``minimoe.routing``): a pure function on logits that
returns a Routing, and a frozen spec that checks its settings and carries its paper's recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from minimoe.checks import check_bool, check_choice, check_float, check_int, require
from minimoe.routing import flags
from minimoe.routing.core import (
    Routing,
    _mask_of_top,
    check_logits,
    check_recipe,
    resolve_renormalize,
)

SCORES = ("sigmoid", "softmax")


def _scores(logits: Tensor, score: str) -> Tensor:
    return logits.sigmoid() if score == "sigmoid" else logits.softmax(dim=-1)


GROUP_SCORES = ("top2_sum", "max")


def group_limited(choice: Tensor, n_group: int, topk_group: int, by: str = "top2_sum") -> Tensor:
    """(T, E) selection scores with every expert outside the token's ``topk_group`` best groups
    set to -inf (DeepSeek-V3 §2.1.2: a group scores the sum of its two best ``choice`` values;
    ``by="max"``: its best one, DeepSeek-V2's ``group_limited_greedy``).

    Experts are in ``n_group`` contiguous groups of E / n_group; at most topk_group groups, so a
    token reaches at most that many devices when each device holds a group (chapter 7).
    """
    T, E = choice.shape
    grouped = choice.view(T, n_group, E // n_group)  # (T, G, E/G)
    top = 1 if by == "max" else min(2, E // n_group)
    group_score = grouped.topk(top, dim=-1).values.sum(dim=-1)  # (T, G)
    allowed = _mask_of_top(group_score, topk_group)  # (T, G), ties to the lower group
    return grouped.masked_fill(~allowed[:, :, None], float("-inf")).view(T, E)


def sigmoid_top_k(
    logits: Tensor,
    k: int = 2,
    bias: Tensor | None = None,
    score: str = "sigmoid",
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
) -> Routing:
    """Top-k on biased scores, weights from the unbiased ones (DeepSeek-V3, arXiv 2412.19437).

    s = sigmoid(logits) (``score="softmax"``: Wang et al.'s softmax ablation); S = the k largest
    s_i + b_i, within the token's best ``topk_group`` of ``n_group`` expert groups;
    g_i = s_i / sum_{j in S} s_j (``renormalize``) times ``scaling`` (the routed scaling factor).
    The bias ``b`` (E,) only selects: it never enters g, so no gradient reaches it.
    ``probs`` is s normalized over all experts (the P_i of DeepSeek-V3's sequence-wise loss).
    """
    logits = check_logits(logits)
    E = logits.shape[1]
    check_int("k", k, 1, E)
    check_choice("score", score, SCORES)
    check_int("n_group", n_group, 1, E)
    check_int("topk_group", topk_group, 1, n_group)
    if E % n_group:
        raise ValueError(f"n_group={n_group} does not divide the {E} experts")
    if k > topk_group * (E // n_group):
        raise ValueError(
            f"k={k} is more than the {topk_group * (E // n_group)} experts of topk_group={topk_group} groups"
        )
    check_bool("renormalize", renormalize)
    check_float("scaling", scaling, 0.0, low_open=True)
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (E,):
            raise ValueError(f"bias must be a tensor of shape ({E},), got {bias!r}")
        # a NaN bias selects no expert for any token: every output would be 0
        require(torch.isfinite(bias).all(), "bias of sigmoid_top_k (router state) is not finite")
    s = _scores(logits, score)  # (T, E)
    choice = (
        s.detach() if bias is None else s.detach() + bias.to(s.dtype)
    )  # selection only: no gradient
    if n_group > 1:
        choice = group_limited(choice, n_group, topk_group)
    mask = _mask_of_top(choice, k)
    weights = s * mask
    if renormalize:
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    probs = s / s.sum(dim=1, keepdim=True)  # (T, E) the normalized affinities
    return Routing(logits=logits, probs=probs, mask=mask, weights=weights * scaling)


def expert_choice(logits: Tensor, capacity_factor: float = 2.0) -> Routing:
    """Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368): experts pick tokens.

    P = softmax(logits) over experts; each expert takes the C tokens with the largest P_ti,
    C = ceil(capacity_factor * T / E) (capped at T), with ``capacity_factor`` the average
    experts per token (the paper's c). g = P on the chosen pairs. Every expert is exactly full;
    a token may get no expert or several. The choice compares tokens with each other, so in a
    causal language model a token's route depends on the later tokens of the batch.
    """
    logits = check_logits(logits)
    T, E = logits.shape
    check_float("capacity_factor", capacity_factor, 0.0, float(E), low_open=True)
    probs = logits.softmax(dim=-1)  # (T, E)
    capacity = min(T, math.ceil(capacity_factor * T / E))  # C = c T / E slots per expert
    mask = _mask_of_top(probs.t(), capacity).t() if T else torch.zeros_like(probs, dtype=torch.bool)
    return Routing(logits=logits, probs=probs, mask=mask, weights=probs * mask)


def check_groups(k: int, n_group: int, topk_group: int, num_experts: int) -> None:
    """Group-limited selection can choose k experts: the groups divide the experts, and the
    topk_group groups a token may use hold at least k of them."""
    if num_experts % n_group:
        raise ValueError(f"n_group={n_group} does not divide num_experts={num_experts}")
    if k > topk_group * (num_experts // n_group):
        raise ValueError(f"k={k} is more than the experts of topk_group={topk_group} groups")


@torch.no_grad()
def loss_free_update(bias: Tensor, tokens_per_expert: Tensor, rate: float) -> None:
    """Wang et al.'s update, in place: b_i += u * sign(mean load - load_i) over the experts
    counted (the first ``len(tokens_per_expert)`` entries of ``bias``): overloaded experts
    become less attractive."""
    load = tokens_per_expert.float()  # (E,) this step's tokens per expert
    bias[: load.shape[0]] += rate * torch.sign(load.mean() - load)


@torch.no_grad()
def compute_target_update(
    bias: Tensor, tokens_per_expert: Tensor, num_tokens: Tensor, k: int, target: float, rate: float
) -> None:
    """LongCat-Flash's bias update toward a compute target (arXiv 2509.01322, section 2.1), in
    place: for each of the E true experts counted (the first ``len(tokens_per_expert)`` entries
    of ``bias``; the free experts' entries stay),

        b_i += u (K_e / (K E) - T_i / (K T))

    with T_i the tokens expert i got of the step's T = ``num_tokens``, K = ``k`` selections per
    token and K_e = ``target`` true experts per token. It stops where every true expert gets
    K_e T / E tokens: the true experts are balanced and a token uses K_e of them on average.
    Proportional, where Wang et al.'s loss-free update takes the sign. A step of no tokens moves
    nothing. On the device, no host sync."""
    load = tokens_per_expert.float()  # (E,) T_i
    E = load.shape[0]
    T = torch.as_tensor(num_tokens, dtype=load.dtype, device=load.device)
    step = target / (k * E) - load / (k * T.clamp_min(1.0))  # (E,)
    bias[:E] += torch.where(T > 0, rate * step, 0.0).to(bias.dtype)


@dataclass(frozen=True)
class SigmoidTopK:
    """DeepSeek-V3's router with auxiliary-loss-free balancing: ``sigmoid_top_k`` with a bias b.

    b is router state (a buffer, never trained by gradient), updated after every optimizer step
    from that step's load: b_i += u * sign(mean load - load_i) (Wang et al. 2024, u = 1e-3;
    ``bias_rate=0`` freezes it). Paper recipe: no auxiliary balance loss and no z-loss;
    DeepSeek-V3 adds a complementary sequence-wise balance loss with alpha = 1e-4
    (``paper_losses``). ``score="softmax"`` is Wang et al.'s softmax-gate ablation.
    With ``k=1``, ``renormalize=True`` gives g = s / s = 1 and the router no gradient (chapter
    1's trap): use ``renormalize=False`` there.
    """

    k: int = field(default=2, metadata=flags.K)
    score: str = field(default="sigmoid", metadata=flags.SCORE | {"choices": SCORES})
    bias_rate: float = field(default=1e-3, metadata=flags.BIAS_RATE)  # u
    n_group: int = field(default=1, metadata=flags.N_GROUP)
    topk_group: int = field(default=1, metadata=flags.TOPK_GROUP)
    # None: True, with a warning at k=1 (no router gradient)
    renormalize: bool | None = field(default=None, metadata=flags.RENORMALIZE)
    # routed scaling factor (2.5 in the DeepSeek-V3 release)
    scaling: float = field(default=1.0, metadata=flags.SCALING)
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "sigmoid_top_k"
    paper_losses: ClassVar[dict[str, float]] = {
        "balance_coef": 0.0,
        "z_coef": 0.0,
        "seq_balance_coef": 1e-4,
    }

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        check_choice("score", self.score, SCORES)
        check_float("bias_rate", self.bias_rate, 0.0)
        check_int("n_group", self.n_group, 1)
        check_int("topk_group", self.topk_group, 1, self.n_group)
        resolve_renormalize(self)
        check_float("scaling", self.scaling, 0.0, low_open=True)
        check_recipe(self)

    def check_experts(self, num_experts: int) -> None:
        check_int("k", self.k, 1, num_experts)
        check_groups(self.k, self.n_group, self.topk_group, num_experts)

    def init_state(self, num_experts: int) -> dict[str, Tensor]:
        return {"bias": torch.zeros(num_experts)}

    def update_state(self, state: dict[str, Tensor], stats) -> None:
        loss_free_update(state["bias"], stats.tokens_per_expert, self.bias_rate)

    def __call__(
        self,
        logits: Tensor,
        *,
        training: bool,
        seq_len: int | None = None,
        state: dict[str, Tensor],
    ) -> Routing:
        return sigmoid_top_k(
            logits,
            self.k,
            bias=state["bias"],
            score=self.score,
            n_group=self.n_group,
            topk_group=self.topk_group,
            renormalize=self.renormalize,
            scaling=self.scaling,
        )


@dataclass(frozen=True)
class ExpertChoice:
    """Expert-choice routing (Zhou et al. 2022): ``expert_choice``; perfectly balanced by
    construction, so no balance loss in the paper's recipe. Not causal: see ``expert_choice``."""

    capacity_factor: float = field(
        default=2.0,
        metadata={
            "flag": "choice_capacity",
            "help": "c: mean experts per token; each expert takes c T / E tokens",
            "positive": True,
        },
    )
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "expert_choice"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 0.0, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_float("capacity_factor", self.capacity_factor, 0.0, low_open=True)
        check_recipe(self)

    def check_experts(self, num_experts: int) -> None:
        check_float("capacity_factor", self.capacity_factor, 0.0, float(num_experts), low_open=True)

    def __call__(self, logits: Tensor, *, training: bool, seq_len: int | None = None) -> Routing:
        return expert_choice(logits, self.capacity_factor)

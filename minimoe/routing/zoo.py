"""The routers of released models, as one composable rule.

Read from the modeling files of Hugging Face transformers (the version the ``bench`` extra pins);
``minimoe.families`` says which family uses which settings. Nearly every released router is

    logits -> (soft cap) -> score s -> selection (s + bias, within groups, top k) -> weights g on
    the chosen (s itself, or a softmax / sigmoid of the chosen logits) -> renormalization -> scale

and ``ScoreTopK`` is that pipeline with one field per step; ``TopK`` and ``SigmoidTopK`` are two
of its settings, kept as they are. Rules that do not fit it: capacity inside the router
(``capacity.py``), hash routing (``hashing.py``) and PhiMoE's rounds (``sparsemixer.py``).

Top-k of the logits then a softmax over the k chosen (gpt-oss, Granite-MoE, JetMoE) is the same
function of the logits as softmax, top-k, renormalize (exp(l_i) / sum_{j in S} exp(l_j) either
way), so the weights and their gradients agree up to rounding; the gradient differs from top-k of
the softmax *without* renormalization (Jamba, DeepSeek-V2), where g_i = P_i keeps the other
experts' logits in its denominator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
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
from minimoe.routing.production import (
    GROUP_SCORES,
    check_groups,
    compute_target_update,
    group_limited,
    loss_free_update,
)

SCORE_FUNCTIONS = {
    "softmax": lambda x: x.softmax(dim=-1),
    "sigmoid": torch.sigmoid,
    "sqrt_softplus": lambda x: F.softplus(x).sqrt(),  # DeepSeek-V4
    "logits": lambda x: x,  # select on the raw logits; ``weight`` says what the chosen get
}
WEIGHTS = ("score", "softmax", "sigmoid")
# the columns whose weights renormalization sums: every chosen one, the chosen true experts,
# every chosen one but the null experts
RENORMALIZE_OVER = ("chosen", "true", "non_null")


def _renormalize(g: Tensor, p: float, eps: float, floor: float) -> Tensor:
    """g / max(||g||_p + eps, floor) per row (the norm over the chosen: g is 0 elsewhere)."""
    norm = g.sum(dim=1, keepdim=True) if p == 1 else g.norm(p=p, dim=1, keepdim=True)
    return g / (norm + eps).clamp_min(max(floor, torch.finfo(g.dtype).tiny))


def check_output_weights(
    renormalize_over: str, identity_experts: int, constant_experts: int
) -> None:
    """Identity and constant experts' weights are part of the output: they stay in the sum."""
    if renormalize_over == "true" and (identity_experts or constant_experts):
        name, value = (
            ("identity_experts", identity_experts)
            if identity_experts
            else ("constant_experts", constant_experts)
        )
        raise ValueError(
            f"renormalize_over='true' with {name}={value}: the weight of an identity or constant "
            "expert is part of the output; renormalize over 'chosen' or 'non_null'"
        )


def normed_router_input(tokens: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """Gemma 4's router input, (T, d) -> (T, d): x / sqrt(mean_j x_j^2 + eps) * s / sqrt(d).

    The RMS norm takes the token's scale out of the logits; the learned s (d,) and d^-1/2 set
    theirs (Hugging Face's ``Gemma4TextRouter``, in the same order of operations)."""
    normed = tokens * (tokens.pow(2).mean(dim=-1, keepdim=True) + eps).pow(-0.5)
    return normed * scale.to(tokens.dtype) * tokens.shape[-1] ** -0.5


def score_top_k(
    logits: Tensor,
    k: int = 2,
    *,
    score: str = "softmax",
    weight: str = "score",
    renormalize: bool = True,
    norm_p: float = 1.0,
    norm_eps: float = 0.0,
    norm_min: float = 0.0,
    scaling: float = 1.0,
    bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "top2_sum",
    softcap: float = 0.0,
    null_experts: int = 0,
    identity_experts: int = 0,
    constant_experts: int = 0,
    balance_all: bool = False,
    renormalize_over: str = "chosen",
    expert_scale: Tensor | None = None,
) -> Routing:
    """The composable top-k rule of released routers (one keyword per step; defaults: Mixtral).

    ``logits`` (T, E + n + m + c): after the E true experts, ``null_experts`` n,
    ``identity_experts`` m and ``constant_experts`` c columns of free experts (zero-computation
    experts, MoE++, arXiv 2410.07348) that compete in every step below: a null expert outputs 0
    (AdaMoE, MoE++'s zero expert, Zaya's skip expert), an identity expert outputs x (MoE++'s copy
    expert, LongCat-Flash's zero-computation expert; the Routing's ``identity`` carries their
    summed weight), a constant expert a learned mix of x and a vector (MoE++; the Routing's
    ``constant`` carries each one's weight, the layer runs them). A token that picks them uses
    fewer true experts. The returned logits, mask and weights cover the E true experts;
    ``balance_all`` also returns ``balance_probs`` and ``balance_mask`` over all C = E + n + m + c
    columns, so the layer's balance loss counts the free experts too (AdaMoE's loss: it is what
    makes a token choose a null expert about n / C of the time).

    1. ``softcap`` c > 0: logits <- c tanh(logits / c) (Laguna, as Gemma 2 caps attention).
    2. s = ``score``(logits): softmax, sigmoid, sqrt(softplus) (DeepSeek-V4), or the logits.
    3. S = the k largest s_i + b_i (``bias`` b, one per column, selects only: DeepSeek-V3, ERNIE,
       LongCat), within the token's ``topk_group`` best of ``n_group`` contiguous groups, a group
       scored by the sum of its two best (``group_score="top2_sum"``, DeepSeek-V3) or its best
       (``"max"``, DeepSeek-V2). No gradient flows through the choice.
    4. g on S: ``weight="score"`` g_i = s_i; ``"softmax"`` softmax over the chosen s (top-k of the
       logits then softmax: gpt-oss, Granite-MoE); ``"sigmoid"`` sigmoid of the chosen s (Llama 4).
    5. ``renormalize``: g <- g / max(||g||_{norm_p} + norm_eps, norm_min) (DBRX's p-norm, ERNIE's
       floor ``norm_min``; DeepSeek code adds eps = 1e-20), the norm over every chosen column
       (``renormalize_over="chosen"``: a token that picks null experts keeps less weight for
       its true ones), over the chosen true experts only (``"true"``: AdaMoE's code; a token that
       picks null experts runs fewer true experts at full weight, one that picks only null
       experts gets 0; not with identity or constant experts, whose weight is output) or over
       every chosen column but the null experts' (``"non_null"``: MoE++'s released code zeroes
       the zero expert's gate before the sum).
    6. g <- ``scaling`` * g (DeepSeek-V3's routed scaling factor), then g_i <- g_i * c_i with
       ``expert_scale`` c (E,), one learned scale per true expert (Gemma 4).

    ``probs`` is the softmax of the (capped) logits for softmax and logit scores, else s
    normalized over all experts (DeepSeek-V3's P_i); over the true experts only, renormalized.
    """
    logits = check_logits(logits)
    C = logits.shape[1]  # columns: E true experts, then the null and identity ones
    check_int("k", k, 1, C)
    check_int("null_experts", null_experts, 0, C - 1)
    check_int("identity_experts", identity_experts, 0, C - 1 - null_experts)
    check_int("constant_experts", constant_experts, 0, C - 1 - null_experts - identity_experts)
    check_bool("balance_all", balance_all)
    check_choice("renormalize_over", renormalize_over, RENORMALIZE_OVER)
    E = C - null_experts - identity_experts - constant_experts
    check_output_weights(renormalize_over, identity_experts, constant_experts)
    if E < C and n_group > 1:
        raise ValueError(f"n_group={n_group}: groups of free (null, identity, constant) experts")
    check_choice("score", score, tuple(SCORE_FUNCTIONS))
    check_choice("weight", weight, WEIGHTS)
    check_bool("renormalize", renormalize)
    check_float("norm_p", norm_p, 0.0, low_open=True)
    check_float("norm_eps", norm_eps, 0.0)
    check_float("norm_min", norm_min, 0.0)
    check_float("scaling", scaling, 0.0, low_open=True)
    check_float("softcap", softcap, 0.0)
    if n_group > 1:
        check_int("n_group", n_group, 1, E)
        check_int("topk_group", topk_group, 1, n_group)
        check_choice("group_score", group_score, GROUP_SCORES)
        if E % n_group or k > topk_group * (E // n_group):
            raise ValueError(
                f"n_group={n_group}, topk_group={topk_group} do not fit k={k} of {E} experts"
            )
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    s = SCORE_FUNCTIONS[score](logits)  # (T, E)
    choice = s.detach() if bias is None else s.detach() + bias.to(s.dtype)
    if n_group > 1:
        choice = group_limited(choice, n_group, topk_group, by=group_score)
    mask = _mask_of_top(choice, k)  # (T, E)
    if weight == "score":
        g = s * mask  # exactly 0 outside S
    elif weight == "softmax":
        g = s.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # softmax over the chosen k
    else:
        g = torch.sigmoid(s) * mask
    if renormalize and renormalize_over != "chosen":  # some free columns leave the sum
        kept = torch.zeros(C, dtype=torch.bool, device=g.device)
        kept[: E if renormalize_over == "true" else C] = True  # AdaMoE: the true experts only
        kept[E : E + null_experts] = False  # MoE++: every column but the null experts
        g = _renormalize(g * kept, norm_p, norm_eps, norm_min)
    elif renormalize:
        g = _renormalize(g, norm_p, norm_eps, norm_min)
    g = g * scaling
    if score in ("softmax", "logits"):
        probs = s if score == "softmax" else logits.softmax(dim=-1)
    else:
        probs = s / s.sum(dim=1, keepdim=True)  # (T, E) the normalized affinities
    weights = g[:, :E]  # (T, E) the true experts'
    if expert_scale is not None:
        weights = weights * expert_scale.to(g.dtype)
    if E == C:
        return Routing(logits=logits, probs=probs, mask=mask, weights=weights)
    real = probs[:, :E]
    copy = E + null_experts  # the first identity column, then the first constant one
    const = copy + identity_experts
    return Routing(
        logits=logits[:, :E],
        probs=real / real.sum(dim=1, keepdim=True),
        mask=mask[:, :E],
        weights=weights,
        identity=g[:, copy:const].sum(dim=1) if identity_experts else None,
        constant=g[:, const:] if constant_experts else None,
        balance_probs=probs if balance_all else None,
        balance_mask=mask if balance_all else None,
    )


@dataclass(frozen=True)
class ScoreTopK:
    """A released model's top-k router: ``score_top_k`` with its settings (see the family table,
    ``python -m minimoe zoo``).

    ``selection_bias=True`` keeps a bias b (one per router column) as router state (a buffer, no
    gradient) that only selects. Hugging Face keeps it as ``e_score_correction_bias`` and no code
    path of it updates b in training: ``bias_rate`` (default 0, frozen) turns on Wang et al.'s
    update after each step, b_i += u * sign(mean load - load_i) (u = 1e-3 in the paper).

    Gemma 4's router trains tensors of its own (``init_params``): ``input_norm`` RMS-norms the
    tokens and multiplies them by a learned scale before the router's matmul
    (``normed_router_input``), ``expert_scales`` multiplies each expert's weight by a learned c_i.

    Free experts: ``null_experts``, ``identity_experts`` and ``constant_experts`` (MoE++, arXiv
    2410.07348: its zero, copy and constant experts; the layer holds the constant experts'
    tensors). MoE++'s heterogeneous balance loss, sum_i eta_i f_i P_i over every column with
    eta = 1 for a true expert and tau = ``free_balance_weight`` for a free one (the paper's
    default tau = 0.75; smaller sends more tokens to the free experts), is the layer's balance
    loss with ``balance_free`` and ``balance_count="selected"`` (its f_i counts the selected).
    MoE++'s gating residuals (a layer's logits plus a learned map of the previous layer's) link
    layers, which a rule over one layer's logits cannot; its per-type capacities are not here
    (dropless), nor its released code's inputs multiplied by k before the experts.

    LongCat-Flash's compute target (arXiv 2509.01322, section 2.1): with ``experts_per_token``
    K_e, the selection bias is updated after each step by b_i += u (K_e / (k E) - T_i / (k T))
    for each true expert (T_i of the step's T tokens; u = ``bias_rate``) and kept for the free
    ones (``compute_target_update``), which steers the mean true experts per token to K_e and
    balances the true experts. The paper decays u on a schedule; here it is constant. Hugging
    Face's ``LongcatFlashTopkRouter`` keeps the bias and never updates it.
    """

    k: int = field(default=2, metadata=flags.K)
    score: str = field(
        default="softmax", metadata=flags.SCORE | {"choices": tuple(SCORE_FUNCTIONS)}
    )
    weight: str = field(
        default="score",
        metadata={
            "flag": "chosen_weight",
            "help": "weights of the chosen experts: their score, or with --score logits a "
            "softmax or sigmoid of their logits",
            "choices": WEIGHTS,
        },
    )
    renormalize: bool = field(default=True, metadata=flags.RENORMALIZE)
    norm_p: float = field(
        default=1.0, metadata={"help": "p of the p-norm that renormalizes", "positive": True}
    )
    norm_eps: float = field(default=0.0, metadata={"help": "eps added to that norm"})
    norm_min: float = field(default=0.0, metadata={"help": "floor of that norm"})
    scaling: float = field(default=1.0, metadata=flags.SCALING)
    selection_bias: bool = field(
        default=False,
        metadata={"help": "keep a selection bias as router state; --bias-rate updates it"},
    )
    bias_rate: float = field(default=0.0, metadata=flags.BIAS_RATE)
    n_group: int = field(default=1, metadata=flags.N_GROUP)
    topk_group: int = field(default=1, metadata=flags.TOPK_GROUP)
    group_score: str = field(
        default="top2_sum",
        metadata={
            "help": "a group's score: the sum of its two best or its best",
            "choices": GROUP_SCORES,
        },
    )
    softcap: float = field(
        default=0.0, metadata={"help": "c of the soft cap c tanh(l / c); 0: none"}
    )
    null_experts: int = field(default=0, metadata={"help": "experts that output 0"})
    identity_experts: int = field(default=0, metadata={"help": "experts that output their input"})
    constant_experts: int = field(
        default=0, metadata={"help": "MoE++'s constant experts: a learned mix of x and a vector"}
    )
    balance_free: bool = field(
        default=False,
        metadata={"help": "the balance loss over every column, free experts too (AdaMoE)"},
    )
    free_balance_weight: float = field(  # MoE++'s tau
        default=1.0,
        metadata={
            "help": "MoE++'s tau: the free experts' balance terms weighted by it",
            "positive": True,
        },
    )
    renormalize_over: str = field(
        default="chosen",
        metadata={
            "help": "renormalize over every chosen column, the chosen true experts only "
            "(AdaMoE's code) or all but the null experts (MoE++'s code)",
            "choices": RENORMALIZE_OVER,
        },
    )
    # LongCat-Flash's K_e: the bias steers the mean true experts per token to it
    experts_per_token: float | None = field(default=None, metadata=flags.TARGET)
    input_norm: bool = field(
        default=False,
        metadata={"help": "RMS-norm the router's input, times a learned scale and d^-1/2"},
    )
    input_norm_eps: float = field(
        default=1e-6, metadata={"help": "eps of that RMS norm", "positive": True}
    )
    expert_scales: bool = field(
        default=False, metadata={"help": "a learned scale per expert multiplies its weight"}
    )
    input_jitter: float = field(default=0.0, metadata=flags.INPUT_JITTER)  # DBRX's, MiniMax-M2's
    jitter_experts: bool = field(default=True, metadata=flags.JITTER_EXPERTS)
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "score_top_k"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        check_choice("score", self.score, tuple(SCORE_FUNCTIONS))
        check_choice("weight", self.weight, WEIGHTS)
        if self.weight != "score" and self.score != "logits":
            raise ValueError(
                f"weight={self.weight!r} applies to the chosen logits: it needs score='logits', "
                f"got score={self.score!r}"
            )
        check_bool("renormalize", self.renormalize)
        check_float("norm_p", self.norm_p, 0.0, low_open=True)
        check_float("norm_eps", self.norm_eps, 0.0)
        check_float("norm_min", self.norm_min, 0.0)
        check_float("scaling", self.scaling, 0.0, low_open=True)
        check_bool("selection_bias", self.selection_bias)
        check_float("bias_rate", self.bias_rate, 0.0)
        if self.bias_rate and not self.selection_bias:
            raise ValueError(f"bias_rate={self.bias_rate} needs selection_bias=True")
        check_int("n_group", self.n_group, 1)
        check_int("topk_group", self.topk_group, 1, self.n_group)
        check_choice("group_score", self.group_score, GROUP_SCORES)
        check_float("softcap", self.softcap, 0.0)
        check_int("null_experts", self.null_experts, 0)
        check_int("identity_experts", self.identity_experts, 0)
        check_int("constant_experts", self.constant_experts, 0)
        check_bool("balance_free", self.balance_free)
        check_float("free_balance_weight", self.free_balance_weight, 0.0, low_open=True)
        check_choice("renormalize_over", self.renormalize_over, RENORMALIZE_OVER)
        check_output_weights(self.renormalize_over, self.identity_experts, self.constant_experts)
        check_bool("input_norm", self.input_norm)
        check_float("input_norm_eps", self.input_norm_eps, 0.0, low_open=True)
        check_bool("expert_scales", self.expert_scales)
        check_jitter(self)
        free = self.null_experts + self.identity_experts + self.constant_experts
        if self.n_group > 1 and free:
            raise ValueError(
                f"n_group={self.n_group}: groups of free (null, identity, constant) experts"
            )
        if self.free_balance_weight != 1.0 and not (free and self.balance_free):
            raise ValueError(
                f"free_balance_weight={self.free_balance_weight} weighs the free experts' balance "
                "terms: it needs free experts and balance_free=True"
            )
        if self.experts_per_token is not None:
            if not (free and self.selection_bias and self.bias_rate):
                raise ValueError(
                    f"experts_per_token={self.experts_per_token} is a compute target the selection "
                    "bias steers to: it needs free experts, selection_bias=True and bias_rate > 0"
                )
            low = max(0, self.k - free)  # a token's fewest true experts
            check_float("experts_per_token", self.experts_per_token, low, self.k, low == 0)
        check_recipe(self)

    def router_columns(self, num_experts: int) -> int:
        """The true experts' logits, then the null, identity and constant experts' (E + n + m + c)."""
        return num_experts + self.null_experts + self.identity_experts + self.constant_experts

    def check_experts(self, num_experts: int) -> None:
        check_int("k", self.k, 1, self.router_columns(num_experts))
        if self.n_group > 1:  # (no groups with free experts: k may exceed E, AdaMoE's k of E + m)
            check_groups(self.k, self.n_group, self.topk_group, num_experts)
        if self.experts_per_token is not None:
            top = min(self.k, num_experts)
            check_float("experts_per_token", self.experts_per_token, 0.0, top, low_open=True)

    def balance_weights(self, num_experts: int) -> Tensor | None:
        """eta (C,) of the layer's balance loss: 1 per true expert, tau per free one (MoE++)."""
        if self.free_balance_weight == 1.0:
            return None
        eta = torch.full((self.router_columns(num_experts),), self.free_balance_weight)
        eta[:num_experts] = 1.0
        return eta

    def init_state(self, num_experts: int) -> dict[str, Tensor]:
        columns = self.router_columns(num_experts)
        return {"bias": torch.zeros(columns)} if self.selection_bias else {}

    def init_params(self, num_experts: int, d_model: int) -> dict[str, Tensor]:
        """Gemma 4's trained router tensors, both 1 at the start: the input scale s (d,) of
        ``input_norm`` and the per-expert scales c (E,) of ``expert_scales``."""
        out = {"input_scale": torch.ones(d_model)} if self.input_norm else {}
        return out | ({"expert_scale": torch.ones(num_experts)} if self.expert_scales else {})

    def router_input(self, tokens: Tensor, state: dict[str, Tensor]) -> Tensor:
        if not self.input_norm:
            return tokens
        return normed_router_input(tokens, state["input_scale"], self.input_norm_eps)

    def update_state(self, state: dict[str, Tensor], stats) -> None:
        """b_i += u * sign(mean load - load_i), or LongCat-Flash's step toward the compute target
        ``experts_per_token``; u = ``bias_rate`` (0: as Hugging Face, frozen). Only the true
        experts' biases move: the free experts keep theirs."""
        if self.experts_per_token is not None:
            compute_target_update(
                state["bias"], stats.tokens_per_expert, stats.num_tokens, self.k,
                self.experts_per_token, self.bias_rate,
            )  # fmt: skip
        elif self.bias_rate:
            loss_free_update(state["bias"], stats.tokens_per_expert, self.bias_rate)

    def __call__(
        self,
        logits: Tensor,
        *,
        training: bool,
        seq_len: int | None = None,
        state: dict[str, Tensor] | None = None,
    ) -> Routing:
        return score_top_k(
            logits,
            self.k,
            score=self.score,
            weight=self.weight,
            renormalize=self.renormalize,
            norm_p=self.norm_p,
            norm_eps=self.norm_eps,
            norm_min=self.norm_min,
            scaling=self.scaling,
            bias=state["bias"] if self.selection_bias else None,
            n_group=self.n_group,
            topk_group=self.topk_group,
            group_score=self.group_score,
            softcap=self.softcap,
            null_experts=self.null_experts,
            identity_experts=self.identity_experts,
            constant_experts=self.constant_experts,
            balance_all=self.balance_free,
            renormalize_over=self.renormalize_over,
            expert_scale=state["expert_scale"] if self.expert_scales else None,
        )

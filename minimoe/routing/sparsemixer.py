"""PhiMoE's router, SparseMixer (Liu et al. 2024, arXiv 2409.12136), at inference and in training.

Read from Hugging Face's ``modeling_phimoe.py`` (the version the ``bench`` extra pins). Each of the
k rounds picks one expert among the logits not yet chosen that are close to the best of them, and
weighs it by a softmax over those close logits alone: no renormalization across rounds. At
inference a round picks the best; in training it samples, and it weighs the pick as Heun's
third-order method asks (the GRIN paper's estimator), so that the router's gradient does not
depend on the sample alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from minimoe.checks import check_bool, check_float, check_int
from minimoe.routing import flags
from minimoe.routing.core import Routing, check_jitter, check_logits, check_recipe


def exponential_at(
    shape: tuple[int, int], at: tuple[Tensor, Tensor], generator: torch.Generator | None = None
) -> Tensor:
    """The Exp(1) numbers ``torch.empty(shape).exponential_(generator=...)[at]`` gives on CPU in
    float32, drawn faster: that kernel draws one 64-bit number per entry, one at a time, makes it
    a double v in [0, 1) from its low 53 bits and returns float32(-log1p(-v)). ``random_`` on an
    int64 tensor makes the same generator calls (the cheapest way to advance it alike), and only
    the entries ``at`` become v and are transformed. (A vectorized log1p can differ from the C
    library's in a double's last bit; rounded to float32, none of 21 million draws differed.)
    """
    bits = torch.empty(shape, dtype=torch.int64).random_(generator=generator)  # (T, E)
    v = (bits[at] & (2**53 - 1)).to(torch.float64) * 2.0**-53
    return torch.log1p(v.neg_()).neg_().to(torch.float32)


def _sampled(masked: Tensor, candidate: Tensor, generator: torch.Generator | None) -> Tensor:
    """(T, 1) one expert per row drawn from softmax(masked): Gumbel-max, argmax(l - log u) with
    u ~ Exp(1) drawn for every (T, E) entry as Hugging Face draws it (``exponential_``). Only
    the ``candidate`` entries can win (the others' l is -inf): on CPU only their u are computed
    (``exponential_at``, in a fraction of the kernel's time)."""
    exact_kernel = masked.device.type != "cpu" or masked.dtype != torch.float32
    if exact_kernel or torch.compiler.is_compiling():  # (Dynamo does not trace random_)
        u = torch.empty_like(masked).exponential_(generator=generator)
        return (masked - u.log()).max(dim=-1)[1].unsqueeze(-1)
    at = candidate.nonzero(as_tuple=True)  # about one entry per row
    score = torch.full_like(masked, float("-inf"))  # (T, E)
    score[at] = masked[at] - exponential_at(masked.shape, at, generator).log_()
    return score.max(dim=-1)[1].unsqueeze(-1)


def _coin(like: Tensor, draws: int, generator: torch.Generator | None) -> Tensor:
    """(T, 1) uniform numbers: the last of ``draws`` draws (Hugging Face's second round draws
    twice, ``rand_like(...).uniform_()``: kept so that one seed gives one routing)."""
    u = torch.rand(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    for _ in range(draws - 1):
        u.uniform_(generator=generator)
    return u


def sparse_mixer(
    logits: Tensor,
    k: int = 2,
    jitter_eps: float = 0.01,
    *,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> Routing:
    """PhiMoE's SparseMixer.

    Round r = 1..k over the logits not chosen in earlier rounds, with m_r their best:
    the candidates are the l_j with (m_r - l_j) / max(|l_j|, m_r) <= 2 eps (``jitter_eps``),
    p_r = softmax over the candidates (the others -inf), and the round's expert e_r

    - at inference (``training=False``): the best, e_r = argmax; g_r = p_r(e_r);
    - in training: sampled from p_r (Gumbel-max; ``generator`` None: torch's global one, as
      Hugging Face), and g_r = c_r p_r(e_r) with c_r = 1 if e_r is p_r's best or, otherwise,
      with probability 1/4, and c_r = 1/3 with probability 3/4 (Heun's third-order midpoint).
      The gradient is that of p_r(e_r) alone, c_r held out (Hugging Face's ``PhimoeMultiplier``):
      d g_r / d l_j = p_r(e_r) (1[j = e_r] - p_r(j)).

    With eps = 0 only the best is a candidate: training routes as inference. The random draws
    are Hugging Face's, in its order: under the same seed both pick the same experts.
    """
    logits = check_logits(logits)
    check_int("k", k, 1, logits.shape[1])
    check_float("jitter_eps", jitter_eps, 0.0)
    check_bool("training", training)
    remaining = logits  # (T, E) chosen experts set to -inf, round after round
    magnitude = logits.detach().abs()  # (T, E)
    picks, gates = [], []  # (T, 1) per round
    for r in range(k):
        with torch.no_grad():
            top, best = remaining.max(dim=1, keepdim=True)  # (T, 1) each
            far = (top - logits) / magnitude.clamp(min=top) > 2 * jitter_eps  # (T, E)
        masked = torch.where(far, float("-inf"), remaining)  # (T, E); masked_fill, faster
        chosen = _sampled(masked.detach(), ~far, generator) if training else best  # (T, 1)
        p = masked.softmax(dim=1)  # (T, E)
        g = p.gather(1, chosen)  # (T, 1)
        if training:
            with torch.no_grad():
                heun = (chosen == p.max(dim=-1, keepdim=True)[1]) | (
                    _coin(g, 1 if r == 0 else 2, generator) > 0.75
                )
                c = torch.add(0.3333, heun, alpha=0.6667).to(g.dtype)  # 1 or 1/3, as HF
            g = (g * c).detach() + (g - g.detach())  # the value c g, the gradient of g
        picks.append(chosen)
        gates.append(g)
        if r < k - 1:
            remaining = remaining.scatter(1, chosen, float("-inf"))
    chosen = torch.cat(picks, dim=1)  # (T, k), distinct per row
    weights = torch.zeros_like(logits).scatter(1, chosen, torch.cat(gates, dim=1))  # (T, E)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)
    return Routing(logits=logits, probs=logits.softmax(dim=-1), mask=mask, weights=weights)


@dataclass(frozen=True)
class SparseMixer:
    """PhiMoE's router: ``sparse_mixer`` (k = 2 in PhiMoE), sampling in training unless
    ``sample_in_training=False`` (then the inference rule in training too).

    ``input_jitter``: PhiMoE's ``input_jitter_noise`` (in training the tokens times
    U(1 - eps, 1 + eps) before the router, the experts' tokens too). Hugging Face's PhiMoE block
    and its router each multiply the same tokens in place: ``jitter_draws=2`` reproduces that.
    """

    k: int = field(default=2, metadata=flags.K)
    jitter_eps: float = field(
        default=0.01,
        metadata={
            "help": "eps: logits within (m - l) / max(|l|, m) <= 2 eps of the best m compete"
        },
    )
    sample_in_training: bool = field(
        default=True,
        metadata={"help": "sample each round's expert in training (Gumbel), Heun-weighted"},
    )
    input_jitter: float = field(default=0.0, metadata=flags.INPUT_JITTER)
    jitter_experts: bool = field(default=True, metadata=flags.JITTER_EXPERTS)
    jitter_draws: int = field(
        default=1,
        metadata={
            "no_flag": "Hugging Face's PhiMoE jitters twice (block and router): a converted setting"
        },
    )
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    name: ClassVar[str] = "sparse_mixer"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 1e-2, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        check_float("jitter_eps", self.jitter_eps, 0.0)
        check_bool("sample_in_training", self.sample_in_training)
        check_jitter(self)
        check_recipe(self)

    def check_experts(self, num_experts: int) -> None:
        check_int("k", self.k, 1, num_experts)

    def __call__(self, logits: Tensor, *, training: bool, seq_len: int | None = None) -> Routing:
        sample = training and self.sample_in_training
        return sparse_mixer(logits, self.k, self.jitter_eps, training=sample)

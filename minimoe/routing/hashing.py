"""Hash routing: the experts are a fixed function of the token id (DeepSeek-V4's first layers,
a frozen token id -> experts table); the router's scores only weigh them. The baseline for "does
learning the router matter?".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from minimoe.checks import check_choice, check_float, check_int
from minimoe.routing import flags
from minimoe.routing.core import Routing, check_logits, check_recipe
from minimoe.routing.zoo import SCORE_FUNCTIONS, _renormalize

HASH_SCORES = ("softmax", "sigmoid", "sqrt_softplus")


def hash_top_k(
    logits: Tensor, experts: Tensor, score: str = "sqrt_softplus", scaling: float = 1.0
) -> Routing:
    """S = ``experts`` (T, k), fixed by the token id (DeepSeek-V4's first layers: a frozen
    token id -> experts table); g = s on S renormalized, times ``scaling``. The router's logits
    only weigh the chosen experts: the choice is not learned (the "does learning the router
    matter?" baseline). Repeated experts in a row of ``experts`` count once.
    """
    logits = check_logits(logits)
    check_choice("score", score, HASH_SCORES)
    if experts.shape[0] != logits.shape[0] or experts.dim() != 2:
        raise ValueError(
            f"experts must have shape (tokens={logits.shape[0]}, k), got {tuple(experts.shape)}"
        )
    s = SCORE_FUNCTIONS[score](logits)  # (T, E)
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(1, experts.long(), True)
    g = _renormalize(s * mask, 1.0, 0.0, 0.0)
    probs = s if score == "softmax" else s / s.sum(dim=1, keepdim=True)
    return Routing(logits=logits, probs=probs, mask=mask, weights=g * scaling)


@dataclass(frozen=True)
class HashTopK:
    """Hash routing (DeepSeek-V4's ``hash_moe`` layers): ``hash_top_k`` with the token id ->
    experts table kept as router state (``table``, (vocab_size, k) long; initialised to a
    fixed pseudo-random draw so a fresh layer spreads tokens evenly, ``seed`` picks it).

    The layer sees hidden states, not token ids: a router that sets ``uses_token_ids`` is called
    with ``token_ids=`` the (T,) ids that ``MoE.forward(x, token_ids=...)`` was given.
    """

    k: int = field(default=2, metadata=flags.K)
    vocab_size: int = field(
        default=256,
        metadata={"flag": "hash_vocab_size", "help": "token ids in the table", "positive": True},
    )
    score: str = field(default="sqrt_softplus", metadata=flags.SCORE | {"choices": HASH_SCORES})
    scaling: float = field(default=1.0, metadata=flags.SCALING)
    seed: int = field(default=0, metadata={"flag": "hash_seed", "help": "seed of the table's draw"})
    balance_count: str = field(default="first", metadata=flags.BALANCE_COUNT)
    dynamic_coef: float = field(default=0.0, metadata=flags.DYNAMIC_COEF)
    uses_token_ids: ClassVar[bool] = True
    name: ClassVar[str] = "hash_top_k"
    paper_losses: ClassVar[dict[str, float]] = {"balance_coef": 0.0, "z_coef": 0.0}

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        check_int("vocab_size", self.vocab_size, 1)
        check_choice("score", self.score, HASH_SCORES)
        check_float("scaling", self.scaling, 0.0, low_open=True)
        check_int("seed", self.seed, 0)
        check_recipe(self)

    def check_experts(self, num_experts: int) -> None:
        check_int("k", self.k, 1, num_experts)

    def init_state(self, num_experts: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        keys = torch.rand(self.vocab_size, num_experts, generator=g)
        return {"table": keys.argsort(dim=1)[:, : self.k]}  # k distinct experts per token id

    def __call__(
        self,
        logits: Tensor,
        *,
        training: bool,
        seq_len: int | None = None,
        state: dict[str, Tensor],
        token_ids: Tensor | None = None,
    ) -> Routing:
        if token_ids is None:
            raise ValueError("hash routing needs token_ids: call MoE(x, token_ids=ids)")
        return hash_top_k(logits, state["table"][token_ids.reshape(-1)], self.score, self.scaling)

"""Auxiliary router losses. Each takes the layer's Routing tensors and returns a scalar.

Computed from the full softmax P (never from the probabilities after selection, a
common slip), unweighted: the coefficients live in the layer's config.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minimoe.routing import _entropy, first_choice

BALANCE_COUNTS = ("first", "selected")


def load_balance_loss(probs: Tensor, mask: Tensor | None = None, count: str = "first") -> Tensor:
    """L_b = E * sum_i f_i * Q_i, with Q_i the mean router probability of expert i.

    ``count="first"`` (Switch, and adaptive gating's top-1 decisions): f_i = share of tokens
    whose first choice is i; L_b = 1 at perfect balance and E when one expert takes all.
    ``count="selected"`` (Top-P paper): f_i = share of tokens whose selected set S (``mask``)
    contains i; not normalized, so it also grows when more experts fire.
    """
    if count not in BALANCE_COUNTS:
        raise ValueError(f"load balance count must be one of {BALANCE_COUNTS}, got count={count!r}")
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.new_zeros(())
    if count == "first":
        first = first_choice(probs)  # (T,) the library's one first-choice rule
        f = torch.bincount(first, minlength=num_experts).to(probs.dtype) / num_tokens  # (E,)
    else:
        if mask is None:
            raise ValueError("load balance count='selected' needs the routing mask")
        f = mask.to(probs.dtype).mean(dim=0)  # (E,)
    q = probs.mean(dim=0)  # (E,) the full softmax mean: the only gradient path
    return num_experts * (f * q).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: L_z = mean_t (logsumexp_j logits_tj)^2, keeps logits small."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return logits.logsumexp(dim=1).square().mean()


def dynamic_loss(probs: Tensor) -> Tensor:
    """Top-P paper's dynamic loss: L_d = mean_t H(P_t), the router entropy in nats.

    Minimizing it sharpens P so top-p cannot buy more experts by flattening the router.
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    return _entropy(probs).mean()

"""Auxiliary router losses. Each takes the layer's Routing tensors and returns a scalar.

Computed from the full softmax P (never from the probabilities after selection, a
common slip), unweighted: the coefficients live in the layer's config.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from minimoe.routing.core import _entropy, top_expert

BALANCE_COUNTS = ("first", "selected")


def load_balance_loss(probs: Tensor, mask: Tensor | None = None, count: str = "first") -> Tensor:
    """L_b = E * sum_i f_i * Q_i, with Q_i the mean router probability of expert i.

    ``count="first"`` (Switch, and adaptive gating's top-1 decisions): f_i = share of tokens
    whose first choice is i; L_b = 1 at perfect balance and E when one expert takes all.
    ``count="selected"`` (Top-P paper): f_i = share of tokens whose selected set S (``mask``)
    contains i; not normalized, so it also grows when more experts fire.

    One layer's tokens, as the layer computes it. Hugging Face's ``load_balancing_loss_func``
    differs in three ways (docs/zoo.md): it pools the counts and probabilities of all layers
    before the product, counts the k selected (``count="selected"``: k at balance, not 1), and
    takes a softmax of the logits and its top k even for sigmoid or biased routers.
    """
    if count not in BALANCE_COUNTS:
        raise ValueError(f"load balance count must be one of {BALANCE_COUNTS}, got count={count!r}")
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.new_zeros(())
    if count == "first":
        first = top_expert(probs)  # (T,) the library's one first-choice rule
        # counted by index_add, not bincount: a fixed (E,) shape that torch.compile can trace
        hits = first.new_zeros(num_experts).index_add_(0, first, torch.ones_like(first))
        f = hits.to(probs.dtype) / num_tokens  # (E,)
    else:
        if mask is None:
            raise ValueError("load balance count='selected' needs the routing mask")
        f = mask.to(probs.dtype).mean(dim=0)  # (E,)
    q = probs.mean(dim=0)  # (E,) the full softmax mean: the only gradient path
    return num_experts * (f * q).sum()


def sequence_balance_loss(
    probs: Tensor,
    mask: Tensor,
    seq_len: int,
    k: float | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, the mean over sequences of L_seq.

    The T tokens are T / ``seq_len`` sequences of ``seq_len`` tokens each. Per sequence of L
    tokens, with S_t the experts token t is sent to (``mask``) and ``probs`` the router's
    normalized scores (the softmax, or DeepSeek-V3's s / sum s):
    f_i = E / (k L) * #{t : i in S_t},  P_i = mean_t probs_ti,  L_seq = sum_i f_i P_i.
    1 at perfect balance with k experts per token. ``k``: experts per token (None: the mean
    of ``mask``, for routers with no fixed k). ``valid`` (T,) bool: the tokens that count
    (False: padding); L is then a sequence's count of them, and a sequence with none is left out.
    """
    if probs.dim() != 2 or mask.shape != probs.shape:
        raise ValueError(
            f"probs and mask must have the same shape (tokens, experts), got "
            f"{tuple(probs.shape)} and {tuple(mask.shape)}"
        )
    num_tokens, num_experts = probs.shape
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise TypeError(f"seq_len must be an int, got seq_len={seq_len!r}")
    if seq_len < 1 or num_tokens % seq_len:
        raise ValueError(
            f"seq_len must be >= 1 and divide the {num_tokens} tokens, got seq_len={seq_len}"
        )
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise TypeError(f"k must be a number or None, got k={k!r}")
        if not 0 < k < math.inf:
            raise ValueError(f"k must be finite and > 0, got k={k!r}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (num_tokens,)):
        raise ValueError(
            f"valid must be a ({num_tokens},) bool tensor, got {valid.dtype} {tuple(valid.shape)}"
        )
    if num_tokens == 0:
        return probs.new_zeros(())
    if valid is not None:
        return _sequence_balance_of_valid(probs, mask, seq_len, k, valid)
    chosen = mask.to(probs.dtype).reshape(-1, seq_len, num_experts)  # (B, L, E)
    if k is None:  # a tensor: no device sync; no expert chosen at all gives f = 0, not 0 / 0
        k = chosen.sum() / num_tokens
        k = k.clamp_min(torch.finfo(probs.dtype).tiny)
    # f_i = E / (k L) * (tokens of the sequence choosing i)
    f = chosen.sum(dim=1) * (num_experts / seq_len) / k  # (B, E)
    # P_i = mean over the sequence's tokens of the normalized scores: the only gradient path
    p = probs.reshape(-1, seq_len, num_experts).mean(dim=1)  # (B, E)
    return (f * p).sum(dim=1).mean()


def _sequence_balance_of_valid(
    probs: Tensor, mask: Tensor, seq_len: int, k: float | None, valid: Tensor
) -> Tensor:
    """``sequence_balance_loss`` over the ``valid`` tokens of each sequence only."""
    E = probs.shape[1]
    w = valid.to(probs.dtype).reshape(-1, seq_len, 1)  # (B, L, 1)
    chosen = mask.to(probs.dtype).reshape(-1, seq_len, E) * w  # (B, L, E)
    n = w.sum(dim=1)  # (B, 1) valid tokens per sequence
    if k is None:  # the mean experts per valid token
        k = (chosen.sum() / n.sum().clamp_min(1)).clamp_min(torch.finfo(probs.dtype).tiny)
    f = chosen.sum(dim=1) * E / (k * n.clamp_min(1))  # (B, E)
    p = (probs.reshape(-1, seq_len, E) * w).sum(dim=1) / n.clamp_min(1)  # (B, E)
    counted = (n[:, 0] > 0).to(probs.dtype)  # (B,)
    return ((f * p).sum(dim=1) * counted).sum() / counted.sum().clamp_min(1)


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

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


def load_balance_loss(
    probs: Tensor,
    mask: Tensor | None = None,
    count: str = "first",
    group_size: int | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """L_b = E * sum_i eta_i f_i * Q_i, with Q_i the mean router probability of expert i.

    ``weights`` (E,) eta, one per column (None: all 1). MoE++'s heterogeneous loss (arXiv
    2410.07348, eq. 7) weighs its zero-computation experts' terms by tau < 1 and its FFN experts'
    by 1, so the loss asks fewer tokens of each FFN expert than of a free one.

    ``count="first"`` (Switch, and adaptive gating's top-1 decisions): f_i = share of tokens
    whose first choice is i; L_b = 1 at perfect balance and E when one expert takes all.
    ``count="selected"`` (Top-P paper): f_i = share of tokens whose selected set S (``mask``)
    contains i; not normalized, so it also grows when more experts fire.

    Where it averages: ``group_size=None`` asks balance of all T tokens at once (one layer's
    tokens, as the layer computes it). ``group_size=n`` cuts the T tokens into consecutive
    groups of n (the sequences of a batch, or the micro-batches of an optimizer step), takes
    f and Q within each group and averages L_b over the groups: balance is asked of every
    group, a stricter demand when a group holds one kind of input (one domain). Over the
    global batch (Qwen3, arXiv 2501.11873) is ``group_size=None`` on all the step's tokens;
    ``accumulated_balance_loss`` is how gradient accumulation approximates it.

    Hugging Face's ``load_balancing_loss_func`` differs in three ways (docs/zoo.md): it pools
    the counts and probabilities of all layers before the product, counts the k selected
    (``count="selected"``: k at balance, not 1), and takes a softmax of the logits and its top
    k even for sigmoid or biased routers.
    """
    if count not in BALANCE_COUNTS:
        raise ValueError(f"load balance count must be one of {BALANCE_COUNTS}, got count={count!r}")
    if count == "selected" and mask is None:
        raise ValueError("load balance count='selected' needs the routing mask")
    num_tokens, num_experts = probs.shape
    n = num_tokens if group_size is None else _check_group(group_size, num_tokens)
    if num_tokens == 0:
        return probs.new_zeros(())
    f = _counts(probs, mask, count, n) / n  # (G, E)
    # Q_i: the full softmax mean, the only gradient path (one group: the plain mean over tokens)
    q = probs.mean(dim=0, keepdim=True) if n == num_tokens else _group_means(probs, n)  # (G, E)
    if weights is not None:
        if not isinstance(weights, Tensor) or weights.shape != (num_experts,):
            raise ValueError(f"weights must be a tensor of shape ({num_experts},), got {weights!r}")
        f = f * weights.to(f)
    return num_experts * (f * q).sum(dim=1).mean()


def accumulated_balance_loss(
    probs: Tensor, mask: Tensor | None = None, count: str = "first", micro_batch: int = 1
) -> Tensor:
    """The global-batch balance loss as gradient accumulation computes it (Qwen3's, arXiv
    2501.11873; Megatron-LM's ``global_aux_loss``): the T tokens are the micro-batches of one
    optimizer step, ``micro_batch`` tokens each, in the order they run. Micro-batch j's loss
    takes f_i from a buffer of the counts of micro-batches 1..j (reset at the optimizer step)
    and Q_i from its own tokens; the step's loss is the mean over its micro-batches.

    The last micro-batch sees the global f; the first only its own. When every micro-batch's
    counts are known before any loss (data-parallel ranks exchanging them in one micro-step),
    f is global throughout and the loss is ``load_balance_loss`` over all T tokens.
    """
    if count not in BALANCE_COUNTS:
        raise ValueError(f"load balance count must be one of {BALANCE_COUNTS}, got count={count!r}")
    if count == "selected" and mask is None:
        raise ValueError("load balance count='selected' needs the routing mask")
    num_tokens, num_experts = probs.shape
    n = _check_group(micro_batch, num_tokens, "micro_batch")
    if num_tokens == 0:
        return probs.new_zeros(())
    hits = _counts(probs, mask, count, n)  # (M, E) each micro-batch's counts
    seen = torch.arange(1, hits.shape[0] + 1, dtype=probs.dtype, device=probs.device) * n  # (M,)
    f = hits.cumsum(dim=0) / seen[:, None]  # (M, E) the buffer's shares after micro-batch j
    q = _group_means(probs, n)  # (M, E) each micro-batch's own Q
    return num_experts * (f * q).sum(dim=1).mean()


def _counts(probs: Tensor, mask: Tensor | None, count: str, n: int) -> Tensor:
    """(G, E) per group of ``n`` consecutive tokens: how many have expert i as their first choice
    (``count="first"``) or in their selected set (``"selected"``), in ``probs``' dtype."""
    num_tokens, num_experts = probs.shape
    if count == "selected":
        return mask.to(probs.dtype).reshape(-1, n, num_experts).sum(dim=1)
    first = top_expert(probs)  # (T,) the library's one first-choice rule
    if n < num_tokens:  # one row of counts per group: index g E + i
        groups = torch.arange(num_tokens, device=probs.device) // n
        first = groups * num_experts + first
    # counted by index_add, not bincount: a fixed shape that torch.compile can trace
    hits = first.new_zeros(num_tokens // n * num_experts).index_add_(
        0, first, torch.ones_like(first)
    )
    return hits.to(probs.dtype).view(-1, num_experts)


def _group_means(x: Tensor, n: int) -> Tensor:
    """(T, E) -> (T / n, E): the mean of every group of ``n`` consecutive rows."""
    return x.reshape(-1, n, x.shape[1]).mean(dim=1)


def _check_group(size: int, num_tokens: int, name: str = "group_size") -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"{name} must be an int, got {name}={size!r}")
    if size < 1 or num_tokens % size:
        raise ValueError(
            f"{name} must be >= 1 and divide the {num_tokens} tokens, got {name}={size}"
        )
    return size


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

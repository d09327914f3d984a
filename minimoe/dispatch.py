"""Dispatch and combine: send each (token, expert) pair to its expert and add the results.

Pure functions of a decision (mask and weights, both (T, E)) and of an experts object
with ``expert(e, x)`` and ``grouped(x_sorted, counts)``; nothing here knows how the
decision was made. Two paths give the same numbers:

- ``combine_loop``: the readable reference (a loop over experts, as HF Mixtral does);
- ``combine_sorted``: sort the (token, expert) pairs by expert, gather, run every expert
  on one contiguous slice, scatter-add with the weights (MegaBlocks' layout).

Capacity: ``capacity = ceil(capacity_factor * T * k / E)`` slots per expert, where T * k
is the number of (token, expert) pairs. Pairs past an expert's capacity are dropped: that
expert's output for the token is 0 (the residual stream carries the token) and the drop is
counted. ``capacity_factor=None`` is dropless.

Dtypes: the output has the input's dtype. Under ``torch.autocast`` the experts compute in the
autocast dtype (bfloat16, say) and their outputs are summed in the input's dtype, so a float32
residual stream stays float32 (as Hugging Face's Mixtral block does).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

DISPATCH_PATHS = ("sorted", "loop")


class ExpertsLike(Protocol):
    def expert(self, e: int, x: Tensor) -> Tensor: ...
    def grouped(self, x: Tensor, counts: list[int] | Tensor) -> Tensor: ...


def expert_capacity(num_pairs: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Slots per expert: ceil(capacity_factor * num_pairs / E), num_pairs = T * k; None if dropless."""
    for name, value, low in (("num_pairs", num_pairs, 0), ("num_experts", num_experts, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {name}={value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {name}={value}")
    if capacity_factor is None:
        return None
    # inf would make ceil() raise OverflowError; nan fails the > 0 test
    if (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, (int, float))
        or not (0 < capacity_factor < math.inf)
    ):
        raise ValueError(
            f"capacity_factor must be finite and > 0, or None, got "
            f"capacity_factor={capacity_factor!r}"
        )
    return math.ceil(capacity_factor * num_pairs / num_experts)


def _check_decision(mask: Tensor, values: Tensor, name: str) -> None:
    """A (T, E) bool mask and a floating (T, E) ``name`` on its device (shapes only: no sync)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError(
            f"mask must be a (tokens, experts) bool tensor, got "
            f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
        )
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got {getattr(values, 'dtype', type(values).__name__)}"
        )
    if values.shape != mask.shape or values.device != mask.device:
        raise ValueError(
            f"{name} of shape {tuple(values.shape)} on {values.device} does not match the mask, "
            f"{tuple(mask.shape)} on {mask.device}"
        )


def apply_capacity(mask: Tensor, probs: Tensor, capacity: int | None) -> Tensor:
    """Keep at most ``capacity`` tokens per expert: (T, E) bool -> (T, E) bool kept.

    Priority as in GShard: every token's first choice claims a slot before any second
    choice; within a choice rank, earlier tokens first.
    """
    if capacity is None:
        return mask
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(
            f"capacity must be an int >= 0 (slots per expert), got capacity={capacity!r}"
        )
    _check_decision(mask, probs, "probs")
    num_tokens, num_experts = mask.shape
    order = probs.masked_fill(~mask, -1.0).argsort(dim=1, descending=True, stable=True)  # (T, E)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(num_experts, device=mask.device).expand(num_tokens, -1)
    )  # (T, E) 0 = the token's first choice
    token = torch.arange(num_tokens, device=mask.device)[:, None]
    last = num_experts * num_tokens  # larger than any priority: unselected pairs go last
    priority = (rank * num_tokens + token).masked_fill(~mask, last)  # (T, E)
    sorted_priority, idx = priority.sort(dim=0, stable=True)  # per expert, by priority
    slot = torch.arange(num_tokens, device=mask.device)[:, None]  # (T, 1)
    kept_sorted = (slot < capacity) & (sorted_priority < last)
    return torch.zeros_like(mask).scatter_(0, idx, kept_sorted)


class SortedPairs(NamedTuple):
    """(token, expert) pairs of a mask, sorted by expert (stable: token order within)."""

    token: Tensor  # (N,) token index of each pair
    expert: Tensor  # (N,) expert index of each pair
    counts: list[int] | Tensor  # pairs per expert, length E (a tensor under torch.compile)


def sort_by_expert(mask: Tensor, k: int | None = None) -> SortedPairs:
    """The pairs of a (T, E) mask grouped by expert, for contiguous per-expert slices.

    Under ``torch.compile`` the counts stay a tensor (no host sync), and with ``k`` (no token
    has more than k experts) the pairs are T * k, a shape the compiler knows: a token with
    fewer than k experts is given filler pairs with experts outside its mask, which the
    combine weighs 0. Without ``k`` the number of pairs depends on the mask: a graph break.
    """
    if not torch.compiler.is_compiling():
        expert_major = mask.t().nonzero()  # (N, 2) rows (expert, token), expert-major, token order
        expert, token = expert_major.unbind(dim=1)
        counts = torch.bincount(expert, minlength=mask.shape[1]).tolist()
        return SortedPairs(token=token, expert=expert, counts=counts)
    num_tokens, num_experts = mask.shape
    if k is None:
        expert, token = mask.t().nonzero().unbind(dim=1)
    else:
        k = min(k, num_experts)
        torch._assert_async((mask.sum(dim=1) <= k).all(), f"a token has more than k={k} experts")
        # (T, k) each token's experts first, in expert order; then all pairs by expert, stable
        chosen = (~mask).to(torch.uint8).argsort(dim=1, stable=True)[:, :k].reshape(-1)
        order = chosen.argsort(stable=True)  # (T * k,) expert-major, token order within
        expert, token = chosen[order], order // k
    counts = torch.zeros(num_experts, dtype=torch.long, device=mask.device)
    counts = counts.index_add(0, expert, torch.ones_like(expert))
    return SortedPairs(token=token, expert=expert, counts=counts)


def combine_sorted(
    x: Tensor, weights: Tensor, mask: Tensor, experts: ExpertsLike, k: int | None = None
) -> Tensor:
    """y_t = sum_{e: mask[t, e]} weights[t, e] * Expert_e(x_t), via sort-gather-scatter.

    ``k``: no token has more than k experts (under ``torch.compile``: fixed shapes, see
    ``sort_by_expert``; ignored otherwise).
    """
    pairs = sort_by_expert(mask, k)
    # index_select, not x[token]: its backward is an index_add, not a slower accumulating index_put
    expert_out = experts.grouped(x.index_select(0, pairs.token), pairs.counts)  # (N, d) gather, run
    if isinstance(pairs.counts, Tensor):  # compiled: look the weights up; filler pairs get 0
        picked = mask[pairs.token, pairs.expert]  # (N,)
        gate = torch.where(picked, weights[pairs.token, pairs.expert], 0).to(x.dtype)[:, None]
    else:
        gate = weights.t()[mask.t()].to(x.dtype)[:, None]  # (N, 1), the pairs' expert-major order
    # sum in x's dtype: under autocast the experts return bfloat16, the float32 stream stays float32
    return torch.zeros_like(x).index_add_(0, pairs.token, expert_out.to(x.dtype) * gate)


def combine_loop(x: Tensor, weights: Tensor, mask: Tensor, experts: ExpertsLike) -> Tensor:
    """The same sum, one expert at a time (the reference path)."""
    out = torch.zeros_like(x)
    for e in range(mask.shape[1]):
        token = mask[:, e].nonzero().squeeze(1)  # (n_e,) tokens sent to expert e
        if token.numel():
            gate = weights[token, e].to(x.dtype)[:, None]  # (n_e, 1)
            out.index_add_(0, token, experts.expert(e, x[token]).to(x.dtype) * gate)
    return out


COMBINE = {"sorted": combine_sorted, "loop": combine_loop}


def combine(
    x: Tensor,
    weights: Tensor,
    mask: Tensor,
    experts: ExpertsLike,
    path: str = "sorted",
    k: int | None = None,
) -> Tensor:
    """Dispatch x (T, d) to the experts by ``mask`` and combine with ``weights``: (T, d).

    Under ``torch.compile`` both paths take the sorted one (the loop's per-expert sizes would
    break the graph once per expert); ``k`` bounds the experts per token (``combine_sorted``).
    """
    if path not in COMBINE:
        raise ValueError(f"unknown dispatch path {path!r}; choose from {DISPATCH_PATHS}")
    _check_decision(mask, weights, "weights")
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != mask.shape[0]:
        raise ValueError(
            f"x must have shape (tokens={mask.shape[0]}, d_model), the mask's tokens, got "
            f"{tuple(getattr(x, 'shape', ()))}"
        )
    if path == "sorted" or torch.compiler.is_compiling():
        return combine_sorted(x, weights, mask, experts, k)
    return COMBINE[path](x, weights, mask, experts)

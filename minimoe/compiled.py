"""The experts as one custom operator, so that ``torch.compile`` can take the MoE layer whole.

Under compilation the rows per expert are a (E,) tensor whose values the compiler cannot know,
so it cannot trace a loop over experts; and it refuses ``F.grouped_mm`` in float32 on CPU
("Expected inputs of BF16 type"). ``expert_ffn`` is opaque to it instead: the compiled graph
sees a (N, d) -> (N, d) operator with fixed output shapes and does not break. At run time the
operator reads the counts on the host (on CUDA a sync, as in the eager layer) and runs
``minimoe.threaded``'s per-expert matmuls, dealt out to threads where the eager layer would
deal them (CPU, OpenMP, enough experts with rows), and its written-out backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minimoe.threaded import ffn_backward, ffn_forward, openmp_backend


def _threads(x: Tensor, counts: list[int], min_experts: int) -> int:
    """Thread groups for these rows: torch's threads on CPU with ``min_experts`` experts with
    rows (the eager layer's rule, minimoe.experts.CPU_THREADED_MIN_EXPERTS), else 1."""
    busy = sum(1 for c in counts if c)
    if x.device.type == "cpu" and openmp_backend() and busy >= min_experts:
        return torch.get_num_threads()
    return 1


def _counts(x: Tensor, counts: Tensor) -> list[int]:
    values = counts.tolist()
    if any(c < 0 for c in values) or sum(values) != x.shape[0]:
        raise ValueError(f"counts must be >= 0 and sum to the {x.shape[0]} rows of x, got {values}")
    return values


@torch.library.custom_op("minimoe::expert_ffn", mutates_args=())
def expert_ffn(
    x: Tensor, gate_up: Tensor, down: Tensor, counts: Tensor, activation: str, min_experts: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows sorted by expert, ``counts[e]`` for expert e: (N, d) -> y (N, d), and the
    pre-activation h and activation a that the backward reads."""
    rows = _counts(x, counts)
    return ffn_forward(x, gate_up, down, rows, activation, _threads(x, rows, min_experts))


@expert_ffn.register_fake
def _(x, gate_up, down, counts, activation, min_experts):
    n = x.shape[0]
    return (
        x.new_empty(n, down.shape[1]),
        x.new_empty(n, gate_up.shape[1]),
        x.new_empty(n, down.shape[2]),
    )


@torch.library.custom_op("minimoe::expert_ffn_backward", mutates_args=())
def expert_ffn_backward(
    grad_y: Tensor,
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    h: Tensor,
    a: Tensor,
    counts: Tensor,
    activation: str,
    min_experts: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``expert_ffn``'s y for x, gate_up and down."""
    rows = _counts(x, counts)
    threads = _threads(x, rows, min_experts)
    # contiguous: the gradients take their operands' layout, and the fake below promises it
    gate_up, down = gate_up.contiguous(), down.contiguous()
    return ffn_backward(grad_y, x, gate_up, down, h, a, rows, activation, threads)


@expert_ffn_backward.register_fake
def _(grad_y, x, gate_up, down, h, a, counts, activation, min_experts):
    return x.new_empty(x.shape), gate_up.new_empty(gate_up.shape), down.new_empty(down.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, gate_up, down, counts, activation, min_experts = inputs
    _, h, a = output
    ctx.save_for_backward(x, gate_up, down, h, a, counts)
    ctx.activation, ctx.min_experts = activation, min_experts


def _backward(ctx, grad_y, grad_h, grad_a):
    # h and a are outputs only for the backward to read: nothing downstream uses them
    x, gate_up, down, h, a, counts = ctx.saved_tensors
    grads = expert_ffn_backward(
        grad_y, x, gate_up, down, h, a, counts, ctx.activation, ctx.min_experts
    )
    return *grads, None, None, None


expert_ffn.register_autograd(_backward, setup_context=_setup_context)

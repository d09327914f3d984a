"""Many small experts on a multi-core CPU: the experts dealt out to threads, one core each.

A matmul on a few dozen rows gains little from being split over cores by torch's intra-op
threads: on the 2-core CPU of benchmarks/README.md, the matmuls of 64 experts on 64 rows each
cost 1.15-1.37x per FLOP what the dense FFN's 2048-row matmuls cost on one core, about 2x on
two. So here the experts are split into as many groups as torch has threads, balanced by rows,
and each group runs on its own thread with one intra-op thread, forward and backward: the
parallelism is across experts, not inside a matmul. Measured there, E=64, T=2048, fwd+bwd: the
experts alone 1.3-1.6x the dense FFN's time against 1.55-1.8x for the grouped kernel; the
whole layer 4-13% less time than with the grouped kernel under glibc's default allocator, 0-6%
with one that keeps freed memory (benchmarks/moe_layer.py's target check).

The backward is written out (the autograd engine would run the experts' backward one after
another on one thread), and the weight gradients go straight into their stacked (E, ., .)
tensors. Each expert's numbers are computed on one thread in a fixed order, so the results do
not depend on which thread ran it: same inputs, same outputs, run after run.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


@functools.cache
def openmp_backend() -> bool:
    """Whether torch's intra-op threads are OpenMP's, whose thread count is per calling thread
    (torch's native pool has one count for the process: there this path is not taken)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


_POOL: dict[str, object] = {"executor": None, "size": 0, "pid": None}
_POOL_LOCK = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, made again after a fork (threads do not survive one)."""
    with _POOL_LOCK:
        if _POOL["executor"] is None or _POOL["size"] != workers or _POOL["pid"] != os.getpid():
            old = _POOL["executor"]
            if old is not None and _POOL["pid"] == os.getpid():
                old.shutdown(wait=False)
            _POOL.update(
                executor=ThreadPoolExecutor(workers, thread_name_prefix="minimoe-experts"),
                size=workers,
                pid=os.getpid(),
            )
        return _POOL["executor"]


def balanced_groups(counts: Sequence[int], n: int) -> list[list[int]]:
    """Experts with rows dealt into at most ``n`` groups of near-equal rows (largest first)."""
    groups: list[list[int]] = [[] for _ in range(n)]
    rows = [0] * n
    for e in sorted((e for e, c in enumerate(counts) if c), key=lambda e: (-counts[e], e)):
        g = rows.index(min(rows))
        groups[g].append(e)
        rows[g] += counts[e]
    return [sorted(g) for g in groups if g]


def run_split(jobs: list[Callable[[], None]]) -> None:
    """Run ``jobs`` at once, each on its own thread with one intra-op thread; then restore.

    The calling thread runs the first job. Grad mode and inference mode are per thread: the
    jobs run as the caller does (inside an autograd Function: without autograd), in inference
    mode when the caller is in it.
    """
    threads = torch.get_num_threads()
    inference = torch.is_inference_mode_enabled()

    def one_core(job: Callable[[], None]) -> None:
        torch.set_num_threads(1)
        with torch.inference_mode() if inference else torch.no_grad():
            job()

    if len(jobs) <= 1:  # nothing to share: this thread, with its usual intra-op threads
        for job in jobs:
            job()
        return
    futures = [_executor(len(jobs) - 1).submit(one_core, job) for job in jobs[1:]]
    errors: list[BaseException] = []
    try:
        one_core(jobs[0])
    except BaseException as err:  # noqa: BLE001  (re-raised below, once the others are done)
        errors.append(err)
    for f in futures:
        try:
            f.result()
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
    torch.set_num_threads(threads)  # MKL's thread count is process-wide: put it back
    if errors:
        raise errors[0]


ACTIVATIONS = ("swiglu", "gelu", "relu")  # relu: Switch Transformers' experts


def check_counts(counts: Sequence[int], rows: int, num_experts: int) -> None:
    """Rows sorted by expert: ``counts`` holds one count >= 0 per expert, summing to ``rows``
    (else some rows would be computed by no expert, or some outputs never written)."""
    if len(counts) != num_experts:
        raise ValueError(
            f"counts has {len(counts)} entries, expected one per expert ({num_experts})"
        )
    for e, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"counts[{e}] must be an int >= 0, got counts[{e}]={c!r}")
    if sum(counts) != rows:
        raise ValueError(f"counts sum to {sum(counts)}, but x has {rows} rows")


def activate(h: Tensor, activation: str, out: Tensor | None = None) -> Tensor:
    """SwiGLU's silu(gate) * up, GELU or ReLU of the pre-activation h (into ``out`` if given)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got activation={activation!r}")
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return torch.mul(F.silu(gate), up, out=out)
    y = F.gelu(h) if activation == "gelu" else F.relu(h)
    return y if out is None else out.copy_(y)


def _activation_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """The gradient with respect to the pre-activation h, given the activation's gradient."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return torch.cat([d_gate, F.silu(gate) * grad], dim=1)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    return torch.ops.aten.threshold_backward(grad, h, 0)  # relu: grad where h > 0


def _starts(counts: Sequence[int]) -> list[int]:
    """Row offsets of the experts' slices: expert e owns rows starts[e]:starts[e + 1]."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return starts


def ffn_forward(
    x: Tensor, gate_up: Tensor, down: Tensor, counts: list[int], activation: str, threads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """y = down_e(act(gate_up_e x)) for rows sorted by expert, the experts dealt into ``threads``
    groups (1: this thread alone). Returns y and, for ``ffn_backward``, the pre-activation h and
    the activation a."""
    x = x.contiguous()  # its row slices are matmul operands
    n, width, hidden = x.shape[0], gate_up.shape[1], down.shape[2]
    starts = _starts(counts)
    h = x.new_empty(n, width)  # pre-activation, kept for backward
    a = x.new_empty(n, hidden)  # activation, kept for backward
    y = x.new_empty(n, down.shape[1])

    def job(experts: list[int]) -> Callable[[], None]:
        def run() -> None:
            for e in experts:
                s, t = starts[e], starts[e + 1]
                torch.mm(x[s:t], gate_up[e].t(), out=h[s:t])
                activate(h[s:t], activation, out=a[s:t])
                torch.mm(a[s:t], down[e].t(), out=y[s:t])

        return run

    run_split([job(g) for g in balanced_groups(counts, threads)])
    return y, h, a


def ffn_backward(
    grad_y: Tensor,
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    h: Tensor,
    a: Tensor,
    counts: list[int],
    activation: str,
    threads: int,
    needs: Sequence[bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``ffn_forward`` for x, gate_up and down (None where ``needs`` is False)."""
    starts = _starts(counts)
    x, grad_y = x.contiguous(), grad_y.contiguous()
    grad_x = torch.empty_like(x) if needs[0] else None
    grad_gate_up = torch.empty_like(gate_up) if needs[1] else None
    grad_down = torch.empty_like(down) if needs[2] else None
    for e, c in enumerate(counts):  # experts without rows get zero gradients
        if c == 0:
            for g in (grad_gate_up, grad_down):
                if g is not None:
                    g[e].zero_()

    def job(experts: list[int]) -> Callable[[], None]:
        def run() -> None:
            for e in experts:
                s, t = starts[e], starts[e + 1]
                gy = grad_y[s:t]
                if grad_down is not None:
                    torch.mm(gy.t(), a[s:t], out=grad_down[e])
                grad_h = _activation_backward(gy @ down[e], h[s:t], activation)
                if grad_gate_up is not None:
                    torch.mm(grad_h.t(), x[s:t], out=grad_gate_up[e])
                if grad_x is not None:
                    torch.mm(grad_h, gate_up[e], out=grad_x[s:t])

        return run

    run_split([job(g) for g in balanced_groups(counts, threads)])
    return grad_x, grad_gate_up, grad_down


class ThreadedExperts(torch.autograd.Function):
    """y = down_e(act(gate_up_e x)) for rows sorted by expert, experts spread over threads."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        gate_up: Tensor,
        down: Tensor,
        counts: list[int],
        activation: str,
        threads: int,
    ) -> Tensor:
        """x (N, d) sorted by expert with ``counts[e]`` rows for expert e; ``threads`` groups."""
        check_counts(counts, x.shape[0], gate_up.shape[0])
        x = x.contiguous()  # its row slices are matmul operands
        y, h, a = ffn_forward(x, gate_up, down, counts, activation, threads)
        ctx.save_for_backward(x, gate_up, down, h, a)
        ctx.counts, ctx.activation, ctx.threads = counts, activation, threads
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, gate_up, down, h, a = ctx.saved_tensors
        grads = ffn_backward(
            grad_y,
            x,
            gate_up,
            down,
            h,
            a,
            ctx.counts,
            ctx.activation,
            ctx.threads,
            needs=ctx.needs_input_grad[:3],
        )
        return *grads, None, None, None

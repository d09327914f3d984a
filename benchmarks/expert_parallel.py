"""Benchmark expert parallelism on CPU: 1 process against 2, per router, in one run.

One MoE layer (E=8 SwiGLU experts, d_model=128, d_hidden=256 per expert, dropless, float32) and
one global batch of T tokens. Two gloo processes on 127.0.0.1 are started once; every round times,
in alternating order, one training step (forward, backward) of:

- ``1 proc x 1 thread``: rank 0 runs the single-process layer on all T tokens, one thread;
- ``1 proc x 2 threads``: the same with two threads (as many cores as the two processes use;
  on a machine that other jobs keep busy, two spinning OpenMP threads can be many times slower:
  ``--no-two-threads`` leaves this variant out);
- ``2 procs x 1 thread``: each rank runs the expert-parallel layer (4 experts) on its T/2 tokens
  and the tokens travel with all_to_all; the time is until both ranks are done.

While rank 0 runs alone, rank 1 waits in a barrier. ``bytes/step`` is what one rank sends to the
other in one step: token rows out, expert outputs back, split sizes, then the same again in
reverse in the backward pass (``Exchange.bytes_sent`` x 2); ``pairs`` is the (token, expert)
pairs each rank's experts process per step. The router weights are scaled by ROUTER_SCALE so
that routing is about as confident as after training (experts/token is printed).

    python benchmarks/expert_parallel.py            # a minute or two on 2 idle CPU cores
    python benchmarks/expert_parallel.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minimoe.layer import MoE, MoEConfig
from minimoe.parallel import ExpertParallelMoE, launch
from minimoe.routing import Adaptive, Router, TopK, TopP

D_MODEL, D_HIDDEN, NUM_EXPERTS, WORLD = 128, 256, 8, 2
ROUTER_SCALE = 4.0
ROUTERS = {"top-2": TopK(k=2), "top-p 0.4": TopP(p=0.4), "adaptive 0.1": Adaptive(threshold=0.1)}
VARIANTS = ("1 proc x 1 thread", "1 proc x 2 threads", "2 procs x 1 thread")


def step(layer: MoE, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """One training step of the layer: forward, task loss plus aux loss, backward."""
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    out = layer(x)
    ((out.output * grad_out).sum() + out.aux_loss).backward()


def timed(fn, everyone: bool) -> float:
    """Seconds from a common start until rank 0 is done (``everyone``: until all ranks are)."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    if everyone:
        dist.barrier()
    seconds = time.perf_counter() - t0
    if not everyone:
        dist.barrier()
    return seconds


def bench_router(
    router: Router, tokens: int, warmup: int, repeats: int, variants: tuple[str, ...]
) -> dict:
    """Runs on both ranks; rank 0's result holds the times."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=D_MODEL, d_hidden=D_HIDDEN, num_experts=NUM_EXPERTS, router=router))
    with torch.no_grad():
        moe.gate.weight.mul_(ROUTER_SCALE)
    ep = ExpertParallelMoE.from_moe(moe)
    x = torch.randn(tokens, D_MODEL).requires_grad_()  # (T, d), the same on every rank
    grad_out = torch.randn(tokens, D_MODEL)
    n = tokens // WORLD
    x_mine = x.detach()[rank * n : (rank + 1) * n].clone().requires_grad_()  # (T/2, d)
    grad_mine = grad_out[rank * n : (rank + 1) * n]

    def alone(threads: int):
        def run() -> None:
            if rank == 0:
                torch.set_num_threads(threads)
                step(moe, x, grad_out)
                torch.set_num_threads(1)

        return run

    runs = {
        VARIANTS[0]: (alone(1), False),
        VARIANTS[1]: (alone(2), False),
        VARIANTS[2]: (lambda: step(ep, x_mine, grad_mine), True),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(warmup + repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            seconds = timed(*runs[v])
            if r >= warmup:
                times[v].append(seconds)
    with torch.no_grad():
        out = ep(x_mine)
    ex = ep.last_exchange
    ept = out.stats.experts_per_token.clone()
    dist.all_reduce(ept)
    return {
        "ms": {v: 1e3 * statistics.median(t) for v, t in times.items()},
        "experts_per_token": ept.item() / WORLD,
        "bytes_per_step": 2 * ex.bytes_sent,
        "pairs_per_step": ex.load,
    }


def worker(tokens: int, warmup: int, repeats: int, variants: tuple[str, ...]) -> dict:
    return {
        name: bench_router(router, tokens, warmup, repeats, variants)
        for name, router in ROUTERS.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: T=1024, 3 repeats")
    parser.add_argument("--tokens", type=int, default=None, help="global batch T (default 4096)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10)")
    parser.add_argument("--no-two-threads", action="store_true", help="skip 1 proc x 2 threads")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    tokens = args.tokens or (1024 if args.quick else 4096)
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = 1 if args.quick else 2
    variants = tuple(v for v in VARIANTS if not (args.no_two_threads and v == VARIANTS[1]))

    print(
        "# minimoe expert parallelism on CPU (gloo, 127.0.0.1)"
        + (" (--quick)" if args.quick else "")
    )
    print(
        f"torch {torch.__version__}; {os.cpu_count()} cores visible; load average "
        + "/".join(f"{v:.2f}" for v in os.getloadavg())
    )
    print(
        f"E={NUM_EXPERTS}, d_model={D_MODEL}, d_hidden={D_HIDDEN}, T={tokens} tokens per step "
        f"({tokens // WORLD} per rank with 2 processes), router weights x{ROUTER_SCALE}; "
        f"median of {repeats} interleaved rounds after {warmup} warm-up\n"
    )
    start = time.perf_counter()
    ranks = launch(worker, world_size=WORLD, args=(tokens, warmup, repeats, variants), timeout=3600)
    print(
        "| router | experts/token | "
        + " | ".join(f"{v} ms" for v in variants)
        + " | speed-up of 2 procs over the faster 1 proc | bytes/step sent per rank "
        "| pairs/step per rank |"
    )
    print("|---|---:|" + "---:|" * len(variants) + "---:|---:|---:|")
    for name in ROUTERS:
        r0, r1 = ranks[0][name], ranks[1][name]
        ms = r0["ms"]
        one = min(ms[v] for v in variants[:-1])
        print(
            f"| {name} | {r0['experts_per_token']:.2f} | "
            + " | ".join(f"{ms[v]:.1f}" for v in variants)
            + f" | {one / ms[VARIANTS[2]]:.2f}x "
            f"| {r0['bytes_per_step'] / 2**20:.2f} MiB, {r1['bytes_per_step'] / 2**20:.2f} MiB "
            f"| {r0['pairs_per_step']}, {r1['pairs_per_step']} |"
        )
    print(f"\nthe single-process runs send nothing; total {time.perf_counter() - start:.0f} s")
    if args.out is not None:
        args.out.write_text(json.dumps({"tokens": tokens, "ranks": ranks}, indent=2))


if __name__ == "__main__":
    main()

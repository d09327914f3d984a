"""Expert parallelism: each MoE layer's experts split over processes, tokens moved by all_to_all.

GShard, DeepSpeed-MoE and MegaBlocks place E / W experts on each of W ranks: rank r owns experts
r E/W ... (r+1) E/W - 1. Every rank keeps a full copy of the router and routes its own tokens
exactly as the single-process layer does (``minimoe.layer.route``, GW broadcast, capacity). Then,
in one forward pass, for the (token, expert) pairs that ``dispatch.combine_sorted`` lists by expert:

1. counts:   every rank tells every other rank how many pairs it will send to each of that
             rank's experts (an all_to_all of E integers: the split sizes);
2. dispatch: ``all_to_all_single`` of the token rows, so rank r receives every pair for its experts;
3. compute:  rank r runs its local experts on the rows it received, grouped by expert;
4. return:   the reverse ``all_to_all_single`` sends each output row back to its token's rank;
5. combine:  y_t = sum_e g_te Expert_e(x_t), on the token's own rank, with the routing weights.

The gradient of an all_to_all is the all_to_all with the split sizes swapped, so the backward
pass runs steps 4 and 2 again in reverse: a training step moves twice the forward's bytes.
gloo on CPU, NCCL on GPU; the code is the same.

What stays per rank: the auxiliary losses and statistics are those of the rank's own tokens, and
capacity is per rank (GShard's groups): ceil(capacity_factor * T_rank * k / E) slots per expert.
Replicated parameters (router, shared expert, attention, embeddings) only see local tokens:
averaging their gradients over ranks is the caller's job (``sync_gradients``, or
``gradient_sync`` around ``minimoe.train.train``, as ``python -m minimoe train
--expert-parallel`` does).

    torchrun --nproc_per_node=2 -m minimoe train --expert-parallel
    python -m torch.distributed.run --nproc_per_node=2 -m minimoe train --expert-parallel
"""

from __future__ import annotations

import copy
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from minimoe.data import Batch
from minimoe.experts import Experts
from minimoe.launcher import launch
from minimoe.layer import MoE, MoEConfig, MoEStats

__all__ = [
    "AllToAll",
    "Exchange",
    "ExpertParallelMoE",
    "ShardedExperts",
    "clip_grad_norm_",
    "gradient_sync",
    "init_distributed",
    "launch",
    "make_expert_parallel",
    "make_single_process",
    "max_difference",
    "pairs_to_ranks",
    "shard_batch",
    "shard_batches",
    "structure",
    "sync_gradients",
]

Group = dist.ProcessGroup | None  # None: the default group, every rank


def _rank_and_world(group: Group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "expert parallelism needs an initialised process group: launch the script with "
            "torchrun (python -m torch.distributed.run) and call minimoe.parallel.init_distributed() "
            "or torch.distributed.init_process_group() first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _broadcast_from_first(tensors: list[Tensor], group: Group) -> None:
    """Overwrite ``tensors`` on every rank with the group's first rank's values."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    to_gpu = dist.get_backend(group) == "nccl"  # NCCL moves CUDA tensors only
    for t in tensors:
        buffer = t.detach().cuda() if to_gpu and not t.is_cuda else t.detach()
        dist.broadcast(buffer, src, group=group)
        if buffer.data_ptr() != t.data_ptr():
            t.detach().copy_(buffer)


# ---- the exchange ---------------------------------------------------------------------------


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with a gradient: rows ``in_splits[r]`` go to rank r, ``out_splits[s]``
    rows arrive from rank s. The gradient is the reverse exchange: the same call, splits swapped.

    (torch.distributed.nn.functional.all_to_all_single does this too, but is deprecated as of
    torch 2.13; these lines keep the backward in view.)
    """

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


@dataclass(frozen=True)
class Exchange:
    """The token traffic of one forward pass of one expert-parallel layer, seen from one rank.

    ``sent[r]``: (token, expert) pairs this rank sends to rank r's experts (its own share is a
    local copy, not traffic). ``received[s]``: pairs rank s sends here; their sum is the load on
    this rank's experts. The backward pass repeats both exchanges in reverse.
    """

    rank: int
    sent: tuple[int, ...]  # (W,)
    received: tuple[int, ...]  # (W,)
    row_bytes: int  # one token row: d_model * element size
    count_bytes: int  # the split sizes one rank sends another: E / W integers

    @property
    def load(self) -> int:
        """Pairs this rank's experts processed."""
        return sum(self.received)

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sends to the other ranks in the forward pass: its token rows out, the
        expert outputs back and the split sizes. It receives exactly as many."""
        rows_out = sum(self.sent) - self.sent[self.rank]
        rows_back = sum(self.received) - self.received[self.rank]
        return (rows_out + rows_back) * self.row_bytes + (len(self.sent) - 1) * self.count_bytes


def pairs_to_ranks(mask: Tensor, world_size: int) -> Tensor:
    """(T, E) mask of the pairs one rank dispatches -> (W,) pairs it sends to each rank."""
    num_tokens, num_experts = mask.shape
    if num_experts % world_size:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the world size {world_size}"
        )
    return mask.reshape(num_tokens, world_size, num_experts // world_size).sum(dim=(0, 2))


class ShardedExperts(nn.Module):
    """This rank's E / W experts (``local``, an Experts) behind the all_to_all exchange.

    Experts are placed in contiguous blocks, so the pairs ``combine_sorted`` sorts by expert are
    already grouped by destination rank. ``last_exchange`` describes the latest forward pass.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "swiglu",
        group: Group = None,
    ):
        super().__init__()
        self.rank, self.world_size = _rank_and_world(group)
        if num_experts % self.world_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the world size "
                f"{self.world_size}: every rank must own the same number of experts"
            )
        self.group, self.num_experts = group, num_experts
        self.local = Experts(
            num_experts=num_experts // self.world_size,
            d_model=d_model,
            d_hidden=d_hidden,
            activation=activation,
        )
        self.first = self.rank * self.local.num_experts  # global index of local expert 0
        self.last_exchange: Exchange | None = None

    def flops_per_assignment(self) -> int:
        return self.local.flops_per_assignment()

    def expert(self, e: int, x: Tensor) -> Tensor:
        raise NotImplementedError("an expert-parallel layer runs on the sorted dispatch path only")

    def grouped(self, x: Tensor, counts: list[int]) -> Tensor:
        """Pairs sorted by global expert, ``counts[e]`` rows for expert e: (N, d) -> (N, d).

        A collective: every rank of the group must call it, once per forward pass.
        """
        W, E_local = self.world_size, self.local.num_experts
        send = torch.tensor(counts, device=x.device).view(
            W, E_local
        )  # (W, E/W) rows for rank r's experts
        recv = _all_to_all(
            send, [1] * W, [1] * W, self.group
        )  # (W, E/W) [s, j]: rows from s for expert j
        sent, received = send.sum(1).tolist(), recv.sum(1).tolist()
        rows = AllToAll.apply(
            x, received, sent, self.group
        )  # (N_recv, d) by source rank, then expert
        expert_of_row = (
            torch.arange(E_local, device=x.device).repeat(W).repeat_interleave(recv.flatten())
        )
        order = expert_of_row.argsort(stable=True)  # (N_recv,) grouped by local expert
        out = self.local.grouped(rows[order], recv.sum(0).tolist())[order.argsort()]  # (N_recv, d)
        if (
            torch.is_grad_enabled()
            and not out.requires_grad
            and (x.requires_grad or any(p.requires_grad for p in self.local.parameters()))
        ):  # no row arrived (out is empty): still take part in both backward exchanges
            out = rows if rows.requires_grad else rows.detach().requires_grad_()
        self.last_exchange = Exchange(
            self.rank,
            tuple(sent),
            tuple(received),
            x.shape[1] * x.element_size(),
            E_local * send.element_size(),
        )
        return AllToAll.apply(out, sent, received, self.group)  # (N, d) back in x's order


# ---- the layer ------------------------------------------------------------------------------


def _check_same_config(config: MoEConfig, group: Group) -> None:
    configs: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(
        configs, {f.name: repr(getattr(config, f.name)) for f in fields(config)}, group=group
    )
    differ = sorted({k for c in configs for k in c if c[k] != configs[0][k]})
    if differ:
        ranks = "; ".join(
            f"rank {r}: " + ", ".join(f"{k}={c[k]!r}" for k in differ)
            for r, c in enumerate(configs)
        )
        raise ValueError(f"MoEConfig differs across ranks in {differ} ({ranks})")


def _gather_rows(x: Tensor, group: Group) -> list[Tensor]:
    """Every rank's ``x`` (n_r, ...), in rank order; the ranks may hold different numbers of
    rows (padded for the exchange, then cut back)."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(x.shape[0], device=x.device), group=group)
    rows = [int(n) for n in sizes]
    padded = x.new_zeros((max(rows), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [part[:n] for part, n in zip(parts, rows)]


class ExpertParallelMoE(MoE):
    """The MoE layer with its experts split over the ranks of ``group`` (default: all of them).

    Routing is exactly MoE's; only ``experts`` differs (a ShardedExperts). The router is
    replicated: the group's first rank's copy is broadcast on construction, and the configs of
    all ranks are checked to be equal. Returns the same MoEOutput, over this rank's tokens.
    Every rank must run forward and backward the same number of times: each is a collective.
    """

    def __init__(self, config: MoEConfig, group: Group = None):
        if config.expert_bias:  # a setting: refused before the process group is asked for
            raise ValueError(
                "ExpertParallelMoE shards expert weights without biases: expert_bias=True"
            )
        _rank_and_world(group)
        config = replace(config, dispatch="sorted")  # the loop path runs experts one at a time
        _check_same_config(config, group)
        super().__init__(config)  # builds all E experts once; replaced by this rank's share below
        self.group = group
        self.experts = ShardedExperts(
            num_experts=config.num_experts,
            d_model=config.d_model,
            d_hidden=config.d_hidden,
            activation=config.activation,
            group=group,
        )
        _broadcast_from_first(self.replicated_parameters(), group)

    @torch.no_grad()
    def update_router_state(self, stats: MoEStats) -> None:
        """The router's state update from every rank's statistics (counts summed, shares averaged
        over the equal shards; the router's measure merged by its ``merge_measures``, else
        averaged), so that all ranks' states stay equal to the single-process one."""
        if not self.stateful:
            return
        world = dist.get_world_size(self.group)
        merge = getattr(self.config.router, "merge_measures", None)
        merged = {}
        for name, value in stats._asdict().items():
            if name == "router_measure" and merge is not None:
                merged[name] = merge(_gather_rows(value, self.group))
                continue
            total = value.clone()
            dist.all_reduce(total, group=self.group)
            merged[name] = total / world if total.is_floating_point() else total
        super().update_router_state(MoEStats(**merged))

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Everything but the routed experts (the router, the shared expert and its gate),
        identical on every rank."""
        return [p for name, p in self.named_parameters() if not name.startswith("experts.")]

    @property
    def last_exchange(self) -> Exchange | None:
        return self.experts.last_exchange

    @classmethod
    def from_moe(cls, moe: MoE, group: Group = None) -> ExpertParallelMoE:
        """This rank's share of a single-process layer: its router and experts r E/W ... (r+1) E/W - 1."""
        layer = cls(moe.config, group).to(moe.gate.weight.device)
        mine = slice(layer.experts.first, layer.experts.first + layer.experts.local.num_experts)
        state = {k: v for k, v in moe.state_dict().items() if not k.startswith("experts.")}
        layer.load_state_dict(
            state
            | {
                f"experts.local.{name}": getattr(moe.experts, name)[mine]
                for name in ("gate_up", "down")
            }
        )
        _broadcast_from_first(layer.replicated_parameters(), group)
        return layer.train(moe.training)

    def to_moe(self) -> MoE:
        """The single-process layer holding every rank's experts (a collective: call on all ranks)."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("experts.")}
        for name in ("gate_up", "down"):
            mine = getattr(self.experts.local, name).detach()
            shards = [torch.empty_like(mine) for _ in range(self.experts.world_size)]
            dist.all_gather(shards, mine.contiguous(), group=self.group)
            state[f"experts.{name}"] = torch.cat(shards)
        moe = MoE(self.config).to(self.gate.weight.device).train(self.training)
        moe.load_state_dict(state)
        return moe


def structure(model: nn.Module) -> list[str]:
    """What must be equal on every rank: each module's name and class, each parameter's and
    buffer's name, shape and dtype, and the model's ``config`` if it has one (values may differ)."""
    lines = [f"module {n or '.'}: {type(m).__name__}" for n, m in model.named_modules()]
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        lines += [f"{kind} {n}: {tuple(t.shape)} {t.dtype}" for n, t in named]
    config = getattr(model, "config", None)
    return lines + ([f"config: {config!r}"] if config is not None else [])


def _check_same_structure(model: nn.Module, group: Group) -> None:
    """Refuse, on every rank alike, models whose structures differ (else the ranks run different
    models, or a broadcast of unequal tensors aborts the process)."""
    mine = structure(model)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            first = next(
                (i for i, (a, b) in enumerate(zip(everyone[0], theirs)) if a != b),
                min(len(theirs), len(everyone[0])),
            )
            line = {
                r: s[first] if first < len(s) else "(nothing)"
                for r, s in ((0, everyone[0]), (rank, theirs))
            }
            raise ValueError(
                f"the model differs across ranks: rank 0 has {line[0]!r}, rank {rank} has "
                f"{line[rank]!r} (every rank must build the same model)"
            )


def make_expert_parallel(model: nn.Module, group: Group = None) -> nn.Module:
    """Replace every MoE layer of ``model`` in place by its ExpertParallelMoE share; return it.

    The model's structure (``structure``) is first compared across ranks, then every parameter
    and buffer is broadcast from the group's first rank, so all ranks start from the same model
    whatever seed each used to build it.
    """
    _rank_and_world(group)
    _check_same_structure(model, group)
    with torch.no_grad():
        _broadcast_from_first([*model.parameters(), *model.buffers()], group)
    if isinstance(model, MoE):
        return ExpertParallelMoE.from_moe(model, group)
    for name, module in list(model.named_modules()):
        if isinstance(module, MoE) and not isinstance(module, ExpertParallelMoE):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ExpertParallelMoE.from_moe(module, group))
    return model


def make_single_process(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every expert-parallel layer gathered back into an MoE (collective)."""
    if isinstance(model, ExpertParallelMoE):
        return model.to_moe()
    gathered = {id(m): m.to_moe() for m in model.modules() if isinstance(m, ExpertParallelMoE)}
    return copy.deepcopy(
        model, memo=gathered
    )  # deepcopy puts each gathered MoE in place of its layer


def max_difference(
    model: nn.Module, single: nn.Module, batch: Batch, group: Group = None
) -> dict[str, float]:
    """Largest |difference|, over all ranks, between an expert-parallel ``model`` and ``single``
    (the same weights in one process: ``make_single_process``) on this rank's ``batch``: of the
    outputs, and of the gradients of sum_r (task loss + aux loss)_r. A collective; both models
    keep their gradients. Use eval mode, or noise and GW broadcast draw differently."""
    rank, _ = _rank_and_world(group)
    outputs = []
    for m in (model, single):
        m.zero_grad(set_to_none=True)
        out = m(**batch)
        (out.loss + out.aux_loss).backward()
        outputs.append(out.logits.detach())
    sharded = {id(p) for p in _split_parameters(model)[1]}
    grad_diff = torch.zeros((), device=outputs[0].device)
    for p, q in zip(model.parameters(), single.parameters()):  # the same order, experts sliced
        mine = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        full = q.grad.clone() if q.grad is not None else torch.zeros_like(q)
        dist.all_reduce(full, group=group)  # single's gradient of the sum over ranks
        if id(p) in sharded:  # the backward all_to_all already summed over ranks
            full = full[rank * len(p) : (rank + 1) * len(p)]
        else:
            dist.all_reduce(mine, group=group)
        grad_diff = torch.maximum(grad_diff, (mine - full).abs().max())
    diffs = torch.stack([(outputs[0] - outputs[1]).abs().max(), grad_diff])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX, group=group)
    return {"output": diffs[0].item(), "gradients": diffs[1].item()}


# ---- data-parallel gradients for the replicated parameters -----------------------------------


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, this rank's experts) among the trainable parameters."""
    sharded = {
        id(p) for m in model.modules() if isinstance(m, ShardedExperts) for p in m.parameters()
    }
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in sharded], [p for p in params if id(p) in sharded]


def sync_gradients(model: nn.Module, group: Group = None) -> None:
    """Turn local gradients into those of the mean loss L = (1/W) sum_r L_r over equal shards.

    Replicated parameters get the mean of the ranks' gradients (one all_reduce); an expert's
    gradient already sums every rank's tokens (the backward all_to_all brought them), so it is
    divided by W. A replicated parameter without a gradient counts as zero.
    """
    _, world = _rank_and_world(group)
    replicated, experts = _split_parameters(model)
    if replicated:
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in replicated]
        )
        dist.all_reduce(flat, group=group)
        for p, g in zip(replicated, flat.div_(world).split([p.numel() for p in replicated])):
            p.grad = g.view_as(p)
    for p in experts:
        if p.grad is not None:
            p.grad.div_(world)


def clip_grad_norm_(model: nn.Module, max_norm: float, group: Group = None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model: replicated parameters counted
    once, every rank's experts once. Call after ``sync_gradients``. Returns the total norm."""
    replicated, experts = _split_parameters(model)
    device = next(model.parameters()).device

    def square_sum(params: list[nn.Parameter]) -> Tensor:
        return sum(
            (p.grad.float().square().sum() for p in params if p.grad is not None),
            torch.zeros((), device=device),
        )

    expert_sq = square_sum(experts)
    dist.all_reduce(expert_sq, group=group)
    total = (square_sum(replicated) + expert_sq).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # the formula of torch's clip_grad_norm_
    for p in replicated + experts:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return total


@contextmanager
def gradient_sync(
    model: nn.Module, max_norm: float | None = None, group: Group = None
) -> Iterator[None]:
    """While active, every optimizer step over ``model``'s parameters first runs sync_gradients,
    then clips by the global norm (so give ``minimoe.train.train`` grad_clip=0)."""
    own = {id(p) for p in model.parameters()}

    def before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if any(id(p) in own for g in optimizer.param_groups for p in g["params"]):
            sync_gradients(model, group)
            if max_norm:
                clip_grad_norm_(model, max_norm, group)

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        yield
    finally:
        handle.remove()


def shard_batch(batch: Batch, group: Group = None) -> Batch:
    """This rank's equal share, along dim 0, of a batch that every rank sampled alike."""
    rank, world = _rank_and_world(group)
    shards = {}
    for key, value in batch.items():
        if value.shape[0] % world:
            raise ValueError(
                f"batch size {value.shape[0]} ({key!r}) is not divisible by the world size {world}"
            )
        n = value.shape[0] // world
        shards[key] = value[rank * n : (rank + 1) * n]
    return shards


def shard_batches(
    get_batch: Callable[[torch.Generator], Batch], group: Group = None
) -> Callable[[torch.Generator], Batch]:
    """Wrap a batch sampler: every rank draws the same global batch and keeps its shard."""
    return lambda generator: shard_batch(get_batch(generator), group)


# ---- launching --------------------------------------------------------------------------------


def init_distributed(device: str = "cpu", timeout_s: float = 300.0) -> str:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
    gloo on CPU, NCCL on CUDA with one GPU per process. Returns the device this rank should use."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "expert parallelism runs under torchrun: torchrun --nproc_per_node=2 "
            "-m minimoe train --expert-parallel (or python -m torch.distributed.run ...)"
        )
    backend = "gloo"
    if torch.device(device).type == "cuda":
        device, backend = f"cuda:{os.environ.get('LOCAL_RANK', '0')}", "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    # torchrun stops the other ranks with SIGTERM when one fails: as an exception, so that
    # cleanups run (a checkpoint being written removes its temporary file)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return device


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)

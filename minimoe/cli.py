"""``python -m minimoe train``: train the tiny MoE model headless and print a summary.

``torchrun --nproc_per_node=2 -m minimoe train --expert-parallel`` trains it with each layer's
experts split over the processes (minimoe/parallel.py); the global batch is split over them too.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist

from minimoe import parallel
from minimoe.analysis import RoutingRecorder, experts_per_token, load_per_expert
from minimoe.data import BYTE_VOCAB_SIZE, VOCAB, byte_corpus, make_multitask, seq_len
from minimoe.experiments.common import (
    add_moe_args,
    add_run_args,
    lm_batches,
    moe_config_from_args,
    multitask_batches,
    write_json,
)
from minimoe.model import ModelConfig, TinyTransformer
from minimoe.train import TrainConfig, save_checkpoint, seed_everything, train


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the tiny MoE transformer and print a summary")
    p.add_argument("--data", default="text", choices=["text", "multitask"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--moe-every", type=int, default=1)
    p.add_argument("--expert-parallel", action="store_true",
                   help="split each layer's experts over the processes of torchrun: "
                        "torchrun --nproc_per_node=2 -m minimoe train --expert-parallel")
    add_moe_args(p)
    add_run_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> dict:
    if args.expert_parallel and args.autocast == "float16":
        # gradient_sync clips the global norm in its own hook, before a GradScaler could unscale
        raise ValueError("--autocast float16 does not combine with --expert-parallel; use bfloat16")
    if args.expert_parallel and not dist.is_initialized():  # under torchrun: join its group
        args.device = parallel.init_distributed(args.device)
        try:
            return main(args)
        finally:
            dist.destroy_process_group()
    rank = dist.get_rank() if args.expert_parallel else 0
    seed_everything(args.seed)
    if args.data == "text":
        corpus = byte_corpus()
        vocab, block = BYTE_VOCAB_SIZE, args.block_size
        get_batch = lm_batches(corpus, args.batch_size, block)
        probe = lm_batches(corpus, 64, block, split="val")(torch.Generator().manual_seed(1))
    else:
        data = make_multitask(4096, seed=args.seed)
        vocab, block = len(VOCAB), seq_len(6)
        get_batch = multitask_batches(data, args.batch_size)
        probe = multitask_batches(make_multitask(512, seed=args.seed + 1), 512)(torch.Generator().manual_seed(1))
    config = ModelConfig(vocab_size=vocab, block_size=block, n_layers=args.layers, n_heads=args.heads,
                         moe=moe_config_from_args(args), moe_every=args.moe_every)
    model = TinyTransformer(config).to(args.device)
    train_config = TrainConfig(steps=args.steps, lr=args.lr, seed=args.seed, autocast=args.autocast,
                               progress=not args.no_progress and rank == 0)
    if args.expert_parallel:
        model, history, ep_summary = train_expert_parallel(model, get_batch, probe, train_config)
        if rank != 0:
            return ep_summary
    else:
        history = train(model, get_batch, train_config)
    model.eval()
    with torch.no_grad(), RoutingRecorder(model) as rec:
        out = model(**{k: v.to(args.device) for k, v in probe.items()})
    layers = [rec.routing(i) for i in range(len(rec))]
    summary = {
        "train_loss": float(np.mean(history.loss[-20:])),
        "val_loss": out.loss.item(),
        "experts_per_token": [round(experts_per_token(r), 3) for r in layers],
        "load_per_expert": [[round(v, 3) for v in load_per_expert(r).tolist()] for r in layers],
        "dropped_pairs_in_training": int(sum(history.dropped_pairs)),
        "autocast": args.autocast,  # None: float32 throughout
    }
    print(f"train loss {summary['train_loss']:.3f}  val loss {summary['val_loss']:.3f}")
    for i, (ept, load) in enumerate(zip(summary["experts_per_token"], summary["load_per_expert"])):
        print(f"layer {i}: experts/token {ept:.2f}  load per expert {load}")
    print(f"dropped (token, expert) pairs during training: {summary['dropped_pairs_in_training']}")
    if args.expert_parallel:
        summary["expert_parallel"] = ep_summary
        print(f"expert parallel over {ep_summary['world_size']} processes: bytes sent per step "
              f"{ep_summary['bytes_sent_per_step']}, pairs per step {ep_summary['pairs_per_step']} "
              f"(per rank); max |expert parallel - single process|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in ep_summary["max_abs_diff_vs_single_process"].items()))
    if args.out is not None:
        write_json(args.out / "summary.json", summary)
        save_checkpoint(model.cpu(), args.out / "model.pt")
        print(f"wrote {args.out}/summary.json and model.pt")
    return summary


def train_expert_parallel(model: TinyTransformer, get_batch, probe: dict, config: TrainConfig):
    """Train with the experts split over the ranks, each rank on its shard of every batch.

    Returns the model gathered into one process, the history (losses averaged and drops summed
    over ranks) and the traffic: per rank and step (forward and backward, all layers), the
    bytes sent to other ranks and the (token, expert) pairs its experts processed; and the
    largest difference of outputs and gradients from the gathered model on the probe batch.
    """
    world, device = dist.get_world_size(), next(model.parameters()).device
    model = parallel.make_expert_parallel(model)
    layers = [m for m in model.modules() if isinstance(m, parallel.ExpertParallelMoE)]
    traffic = []

    def record(step, model, out) -> None:
        exchanges = [m.last_exchange for m in layers]  # the backward repeats each exchange
        traffic.append((2 * sum(e.bytes_sent for e in exchanges), sum(e.load for e in exchanges)))

    with parallel.gradient_sync(model, max_norm=config.grad_clip):  # it clips by the global norm
        history = train(model, parallel.shard_batches(get_batch), replace(config, grad_clip=0.0),
                        callback=record)
    loss, dropped = torch.tensor(history.loss), torch.tensor(history.dropped_pairs)
    dist.all_reduce(loss)
    dist.all_reduce(dropped)
    history.loss, history.dropped_pairs = (loss / world).tolist(), dropped.tolist()

    single = parallel.make_single_process(model).eval()
    shard = {k: v.to(device) for k, v in parallel.shard_batch(probe).items()}
    diffs = parallel.max_difference(model.eval(), single, shard)
    single.zero_grad(set_to_none=True)
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, np.mean(traffic, axis=0).tolist() if traffic else [0.0, 0.0])
    return single, history, {
        "world_size": world,
        "bytes_sent_per_step": [round(b) for b, _ in per_rank],
        "pairs_per_step": [round(n, 1) for _, n in per_rank],
        "max_abs_diff_vs_single_process": diffs,
    }

"""``python -m minimoe train``: train the tiny MoE model headless and print a summary."""

from __future__ import annotations

import argparse

import numpy as np
import torch

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
    add_moe_args(p)
    add_run_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> dict:
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
    history = train(model, get_batch, TrainConfig(steps=args.steps, lr=args.lr, seed=args.seed,
                                                  progress=not args.no_progress))
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
    }
    print(f"train loss {summary['train_loss']:.3f}  val loss {summary['val_loss']:.3f}")
    for i, (ept, load) in enumerate(zip(summary["experts_per_token"], summary["load_per_expert"])):
        print(f"layer {i}: experts/token {ept:.2f}  load per expert {load}")
    print(f"dropped (token, expert) pairs during training: {summary['dropped_pairs_in_training']}")
    if args.out is not None:
        write_json(args.out / "summary.json", summary)
        save_checkpoint(model.cpu(), args.out / "model.pt")
        print(f"wrote {args.out}/summary.json and model.pt")
    return summary

"""The library's command line: ``python -m minimoe train`` trains the tiny MoE model headless.

``torchrun --nproc_per_node=2 -m minimoe train --expert-parallel`` trains it with each layer's
experts split over the processes (minimoe/parallel.py); the global batch is split over them too.

Routers are named on the command line only: ``--router`` is a name of ``routing.ROUTERS`` and
its settings are flags (``--k``, ``--top-p``, ...: ``ROUTER_FLAGS``) made from the specs' fields
(minimoe/routing/flags.py), which ``router_from_flags`` turns into a spec. A flag for another
router is refused, and so is a number out of range, each with an error naming the flag. The course's chapter experiments have
their own command, ``python -m course``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from minimoe import parallel
from minimoe.analysis import RoutingRecorder, experts_per_token, load_per_expert, max_violation
from minimoe.data import (
    BYTE_VOCAB_SIZE,
    VOCAB,
    byte_corpus,
    lm_batches,
    make_multitask,
    multitask_batches,
    seq_len,
)
from minimoe.dispatch import DISPATCH_PATHS
from minimoe.layer import MoEConfig, moe_layers
from minimoe.model import ModelConfig, TinyTransformer
from minimoe.routing import ROUTERS, Router, router_from_name
from minimoe.routing.flags import Setting, router_flags
from minimoe.train import TrainConfig, save_checkpoint, seed_everything, train


class UsageError(ValueError):
    """Options that do not fit together; ``run_commands`` reports it as the command's usage error."""


# ---- numbers checked by argparse: "argument --lr: must be a number > 0, got 'nan'" -------------


def _number(
    convert: Callable[[str], Any], low: float, strict: bool = False
) -> Callable[[str], Any]:
    kind = "an int" if convert is int else "a number"
    bound = f"{'>' if strict else '>='} {low:g}"

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {kind} {bound}, got {text!r}")
        return value

    return parse


non_negative = _number(float, 0)
positive = _number(float, 0, strict=True)
non_negative_int = _number(int, 0)
positive_int = _number(int, 1)


# ---- routers from flags ---------------------------------------------------------------------

# flag (its argparse dest) -> each router's field it sets (``Setting``: type, range, help), read
# from the registered specs' fields: minimoe/routing/flags.py says how a field declares its flag
ROUTER_FLAGS: dict[str, tuple[Setting, ...]] = router_flags(ROUTERS)
NUMBERS = {
    (int, True): positive_int,
    (int, False): non_negative_int,
    (float, True): positive,
    (float, False): non_negative,
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def router_from_flags(name: str, **flags: Any) -> Router:
    """The spec of ``--router name`` and its flags by dest (``k=1``, ``top_p=0.3``), built by
    ``routing.router_from_name``; ``--router gw`` builds its top-k base from ``--k``. A flag of
    another router, or a value the spec refuses, is a ``UsageError`` naming the flag."""
    settings: dict[str, Any] = {}
    bases: dict[str, dict[str, Any]] = {}  # the settings of a router's base, by its field
    for dest, value in flags.items():
        if dest not in ROUTER_FLAGS:
            raise UsageError(
                f"unknown router flag {_flag(dest)}; choose from "
                + ", ".join(_flag(d) for d in ROUTER_FLAGS)
            )
        field = {s.router: s.field for s in ROUTER_FLAGS[dest]}.get(name)
        if field is None:
            raise UsageError(
                f"{_flag(dest)} does not apply to --router {name} (it is a setting of "
                f"{', '.join(s.router for s in ROUTER_FLAGS[dest])})"
            )
        base, _, own = field.rpartition(".")  # "base.k": the k of the router's base
        if base:
            bases.setdefault(base, {})[own] = value
        else:
            settings[field] = value
    try:
        for f in fields(ROUTERS[name]) if bases else ():
            if f.name in bases:  # built as the router its metadata names (gw: top_k)
                settings[f.name] = router_from_name(f.metadata["base"], **bases[f.name])
        return router_from_name(name, **settings)
    except (TypeError, ValueError) as e:
        given = " ".join(f"{_flag(dest)} {value}" for dest, value in flags.items())
        raise UsageError(f"--router {name} {given}: {e}") from None


def _router_help(settings: tuple[Setting, ...]) -> str:
    """What the flag sets and in which routers, with a router's choices where it takes fewer
    than the flag and the specs' defaults: "experts per token (top_k, ...; default 2)"."""
    every = _choices(settings)
    one_default = len({repr(s.default) for s in settings}) == 1
    routers, noted = [], False
    for s in settings:
        outer = s.field.rpartition(".")[0]
        notes = []
        if s.choices is not None and len(s.choices) < len(every):
            notes.append(", ".join(s.choices[:-1]) + f" or {s.choices[-1]}")
        if not one_default and s.default is not None:
            notes.append(f"default {s.default}")
        noted |= bool(notes)
        label = f"{s.router}'s {outer}" if outer else s.router
        routers.append(f"{label}: {', '.join(notes)}" if notes else label)
    default = settings[0].default
    tail = f"; default {default}" if one_default and default is not None else ""
    return f"{settings[0].help} ({('; ' if noted else ', ').join(routers)}{tail})"


def _choices(settings: tuple[Setting, ...]) -> tuple[str, ...] | None:
    """The choices of every router that has the flag, in order; None: the flag takes no choices."""
    merged = dict.fromkeys(c for s in settings for c in s.choices or ())
    return tuple(merged) or None


def _add_router_args(g: argparse._ArgumentGroup) -> None:
    """One option per router flag (``ROUTER_FLAGS``), defaulting to None: "not given"."""
    for dest, settings in ROUTER_FLAGS.items():
        kind, positive = settings[0].kind, settings[0].positive
        option: dict[str, Any] = {"help": _router_help(settings)}
        if kind is bool:
            option["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float):
            option["type"] = NUMBERS[kind, positive]
        else:
            option["choices"] = _choices(settings)
        g.add_argument(_flag(dest), **option)


def add_moe_args(p: argparse.ArgumentParser) -> None:
    """The router (by name) with its flags, and the layer's options, named as MoEConfig's fields.
    Router flags default to None ("not given": the spec's default)."""
    g = p.add_argument_group("router (flags of another router than --router are refused)")
    g.add_argument("--router", default="top_k", choices=sorted(ROUTERS), help="routing rule")
    _add_router_args(g)
    g = p.add_argument_group("MoE layer")
    g.add_argument("--experts", type=positive_int, default=8, help="number of experts")
    g.add_argument("--d-model", type=positive_int, default=64, help="model width")
    g.add_argument("--d-hidden", type=positive_int, default=128, help="width of each expert")
    g.add_argument("--capacity-factor", type=positive, default=None, help="omit for dropless")
    g.add_argument("--balance-coef", type=non_negative, default=1e-2, help="alpha of L_b")
    g.add_argument("--z-coef", type=non_negative, default=1e-3, help="router z-loss weight")
    g.add_argument(
        "--dynamic-coef",
        type=non_negative,
        default=None,
        help="default: the router's (top_p: 1e-4, else 0)",
    )
    g.add_argument(
        "--seq-balance-coef",
        type=non_negative,
        default=0.0,
        help="DeepSeek-V3's sequence-wise balance loss",
    )
    g.add_argument("--shared-hidden", type=non_negative_int, default=0, help="shared expert width")
    g.add_argument("--shared-gate", action="store_true", help="Qwen2-MoE's sigmoid shared gate")
    g.add_argument("--dispatch", default="sorted", choices=DISPATCH_PATHS, help="dispatch path")


def moe_config_from_args(args: argparse.Namespace, **changes: Any) -> MoEConfig:
    """The MoEConfig of ``add_moe_args``'s options (``changes`` override fields); a router flag
    that does not apply, or options the config refuses, raise ``UsageError``."""
    flags = {
        dest: getattr(args, dest) for dest in ROUTER_FLAGS if getattr(args, dest, None) is not None
    }
    fields = dict(
        d_model=args.d_model,
        d_hidden=args.d_hidden,
        num_experts=args.experts,
        router=router_from_flags(args.router, **flags),
        capacity_factor=args.capacity_factor,
        balance_coef=args.balance_coef,
        z_coef=args.z_coef,
        dynamic_coef=args.dynamic_coef,
        seq_balance_coef=args.seq_balance_coef,
        shared_hidden=args.shared_hidden,
        shared_gate=args.shared_gate,
        dispatch=args.dispatch,
    )
    try:
        return MoEConfig(**(fields | changes))
    except (TypeError, ValueError) as e:
        raise UsageError(f"MoE options: {e}") from None


def add_run_args(p: argparse.ArgumentParser, steps: int = 300) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=positive_int, default=steps, help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, default=32, help="sequences per step")
    g.add_argument("--lr", type=positive, default=3e-3, help="AdamW learning rate")
    g.add_argument("--seed", type=non_negative_int, default=0, help="weights, batches, noise")
    g.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:1, ... (default here: %(default)s)",
    )
    g.add_argument(
        "--autocast",
        choices=("bfloat16", "float16"),
        default=None,
        help="mixed precision (float16: CUDA only); routers stay float32",
    )
    g.add_argument(
        "--out", type=Path, default=None, help="folder for results (JSON, plots, checkpoint)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (None and False: "not given", not shown)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if shown and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def run_banner(model: nn.Module, tokens_per_step: int, steps: int, device: str) -> str:
    """What is about to run, before the progress bar: sizes, device, threads, a rough time."""
    layers = moe_layers(model)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for m in layers for p in m.experts.parameters())
    router = layers[0].config.router if layers else None
    k = getattr(router, "k", None) or getattr(getattr(router, "base", None), "k", None) or 2
    E = layers[0].config.num_experts if layers else 1
    active = total - routed + routed * min(k, E) / E  # per token, about (top-p, adaptive vary)
    where = f"device {device}"
    if str(device).startswith("cpu"):
        # ~10 GFLOP/s: what these small matmuls reach on one laptop core, about (6 FLOPs/param)
        seconds = steps * tokens_per_step * 6 * active / (10e9 * torch.get_num_threads() ** 0.5)
        where += f", torch threads: {torch.get_num_threads()}, roughly {_duration(seconds)}"
    return (
        f"model: {total / 1e6:.2f}M parameters, about {active / 1e6:.2f}M active per token "
        f"({len(layers)} MoE layers x {E} experts); {steps} steps of {tokens_per_step} tokens; "
        f"{where} (the bar shows the time left)"
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def run_commands(
    prog: str, description: str, modules: Sequence[str], argv: list[str] | None = None
) -> Any:
    """Parse ``argv`` with one subcommand per module (each has ``add_parser(subparsers)``) and
    run it; a ``UsageError`` becomes the subcommand's usage error (exit status 2)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in modules:
        importlib.import_module(name).add_parser(sub)
    for command in sub.choices.values():
        command.formatter_class = DefaultsHelpFormatter
    args = parser.parse_args(argv)
    # the command as typed, for results that record the command that regenerates them
    args.command_line = " ".join([prog, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UsageError as e:
        sub.choices[args.command].error(str(e))


# ---- the train command ----------------------------------------------------------------------


TRAIN_DESCRIPTION = """Train the tiny MoE transformer (minimoe.model.TinyTransformer) on Shakespeare
bytes (--data text) or the graded multi-task sequences (--data multitask), then print the loss,
experts per token, load per expert and dropped tokens; --out also writes summary.json and a
checkpoint. The defaults (2 layers of 8 experts, top-2, 300 steps) take about a minute on a
laptop CPU. Routers are names of minimoe.routing.ROUTERS; a flag of another router than
--router is refused."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the tiny MoE transformer and print a summary",
        description=TRAIN_DESCRIPTION,
    )
    p.add_argument("--data", default="text", choices=["text", "multitask"], help="training data")
    p.add_argument("--layers", type=positive_int, default=2, help="transformer blocks")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    p.add_argument(
        "--block-size", type=positive_int, default=None, help="tokens per sequence, text only (64)"
    )
    p.add_argument("--moe-every", type=positive_int, default=1, help="an MoE FFN every n blocks")
    p.add_argument(
        "--expert-parallel",
        action="store_true",
        help="split each layer's experts over the processes of torchrun: "
        "torchrun --nproc_per_node=2 -m minimoe train --expert-parallel",
    )
    add_moe_args(p)
    add_run_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> dict:
    """Train and summarize; router options that do not fit raise ``UsageError`` before any work."""
    if args.expert_parallel and args.autocast == "float16":
        # gradient_sync clips the global norm in its own hook, before a GradScaler could unscale
        raise ValueError("--autocast float16 does not combine with --expert-parallel; use bfloat16")
    moe = moe_config_from_args(args)
    if args.moe_every > args.layers:
        raise UsageError(
            f"--moe-every {args.moe_every} with --layers {args.layers} builds no MoE layer "
            "(every moe_every-th layer is MoE): give --moe-every <= --layers"
        )
    if args.data == "multitask" and args.block_size is not None:
        raise UsageError(
            "--block-size applies to --data text; the multitask sequences have their own length"
        )
    if args.expert_parallel and not dist.is_initialized():  # under torchrun: join its group
        args.device = parallel.init_distributed(args.device)
        try:
            summary = main(args)
            # rank 0 writes the results after the others are done: no rank tears the group down
            # (which a busy machine has seen abort) while another still works
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return summary
    rank = dist.get_rank() if args.expert_parallel else 0
    seed_everything(args.seed)
    if args.data == "text":
        corpus = byte_corpus()
        vocab, block = BYTE_VOCAB_SIZE, args.block_size or 64
        get_batch = lm_batches(corpus, args.batch_size, block)
        probe = lm_batches(corpus, 64, block, split="val")(torch.Generator().manual_seed(1))
    else:
        data = make_multitask(4096, seed=args.seed)
        vocab, block = len(VOCAB), seq_len(6)
        get_batch = multitask_batches(data, args.batch_size)
        probe = multitask_batches(make_multitask(512, seed=args.seed + 1), 512)(
            torch.Generator().manual_seed(1)
        )
    config = ModelConfig(
        vocab_size=vocab,
        block_size=block,
        n_layers=args.layers,
        n_heads=args.heads,
        moe=moe,
        moe_every=args.moe_every,
    )
    model = TinyTransformer(config).to(args.device)
    train_config = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        autocast=args.autocast,
        progress=not args.no_progress and rank == 0,
    )
    if rank == 0:
        print(run_banner(model, args.batch_size * block, args.steps, args.device), flush=True)
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
        "maxvio": [round(max_violation(r), 3) for r in layers],  # over the probe batch
        "dropped_pairs_in_training": int(sum(history.dropped_pairs)),
        "autocast": args.autocast,  # None: float32 throughout
    }
    print(f"train loss {summary['train_loss']:.3f}  val loss {summary['val_loss']:.3f}")
    per_layer = zip(summary["experts_per_token"], summary["maxvio"], summary["load_per_expert"])
    for i, (ept, maxvio, load) in enumerate(per_layer):
        print(f"layer {i}: experts/token {ept:.2f}  maxvio {maxvio:.3f}  load per expert {load}")
    print(f"dropped (token, expert) pairs during training: {summary['dropped_pairs_in_training']}")
    if args.expert_parallel:
        summary["expert_parallel"] = ep_summary
        print(
            f"expert parallel over {ep_summary['world_size']} processes: bytes sent per step "
            f"{ep_summary['bytes_sent_per_step']}, pairs per step {ep_summary['pairs_per_step']} "
            f"(per rank); max |expert parallel - single process|: "
            + ", ".join(
                f"{k} {v:.1e}" for k, v in ep_summary["max_abs_diff_vs_single_process"].items()
            )
        )
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
        history = train(
            model,
            parallel.shard_batches(get_batch),
            replace(config, grad_clip=0.0),
            callback=record,
        )
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
    return (
        single,
        history,
        {
            "world_size": world,
            "bytes_sent_per_step": [round(b) for b, _ in per_rank],
            "pairs_per_step": [round(n, 1) for _, n in per_rank],
            "max_abs_diff_vs_single_process": diffs,
        },
    )

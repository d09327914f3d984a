"""Training: seeding, a small loop with a progress bar, evaluation, checkpoints.

The loop is model-agnostic: ``get_batch(generator)`` returns a dict of keyword arguments
for the model (``{"idx": ..., "targets": ...}`` for the transformer, ``{"x": ..., "y": ...}``
for the toy regressor), and the model returns a ``ModelOutput``. The loss optimised is
``output.loss + output.aux_loss``.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import random
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from minimoe.analysis import max_violation
from minimoe.checks import check_bool
from minimoe.data import Batch
from minimoe.layer import MoEConfig, moe_layers
from minimoe.model import ModelConfig, MoERegressor, TinyTransformer


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for data sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only at the end (if an evaluate function is given)
    freeze_router: bool = False  # GW-MoE fine-tuning keeps the router fixed
    autocast: str | None = None  # mixed precision: "bfloat16" (CPU or CUDA) | "float16" (CUDA)
    # "constant" | "cosine": the learning rate decays to 0 by the last step, so a run ends
    # where it stops improving rather than where it was cut off
    lr_schedule: str = "constant"
    # the schedule's length, if longer than ``steps``: train the first ``steps`` of a longer run
    # (to check a cached run by its first steps); None: ``steps``
    schedule_steps: int | None = None
    # steps of the schedule already trained (a run continued from a snapshot at that step, with a
    # fresh optimizer): step s of this run trains at the schedule's step start_step + s
    start_step: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "seed", "eval_every", "start_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise TypeError(f"{name} must be an int, got {name}={value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={value!r}")
        if self.schedule_steps is not None:
            value = self.schedule_steps
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise TypeError(f"schedule_steps must be an int, got schedule_steps={value!r}")
            if value < self.start_step + self.steps:
                raise ValueError(
                    f"schedule_steps must be >= start_step + steps = "
                    f"{self.start_step + self.steps}, got schedule_steps={value!r}"
                )
        check_bool("freeze_router", self.freeze_router)
        check_bool("progress", self.progress)
        if self.seed >= 2**32:  # numpy's seed range
            raise ValueError(f"seed must be < 2**32, got seed={self.seed!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"{name} must be a number, got {name}={value!r}")
            # grad_clip < 0 would flip the gradients (ascent); 0 means no clipping
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                bound = "> 0" if name == "lr" else ">= 0"
                raise ValueError(f"{name} must be finite and {bound}, got {name}={value!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got lr_schedule={self.lr_schedule!r}"
            )
        if self.autocast not in AUTOCAST:
            raise ValueError(
                f"autocast must be one of {sorted(AUTOCAST, key=str)}, got {self.autocast!r}"
            )


LR_SCHEDULES = ("constant", "cosine")
AUTOCAST = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class History:
    """Per-step training record; ``evals`` holds (step, metrics) pairs."""

    loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    experts_per_token: list[list[float]] = field(default_factory=list)  # [step][layer]
    # MaxVio_batch (analysis.max_violation) [step][layer]; expert parallel: the rank's tokens;
    # NaN for a layer whose batch reached no expert (ReLU gates or thresholds can route nothing)
    max_violation: list[list[float]] = field(default_factory=list)
    dropped_pairs: list[int] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @property
    def final_eval(self) -> dict[str, float]:
        return self.evals[-1][1] if self.evals else {}


def routers(model: nn.Module) -> list[nn.Module]:
    """Every MoE router's parameters (``gate``, ``gate_extra`` and ``router_params``) as modules."""
    found = []
    for m in moe_layers(model):
        found += [m.gate] + ([m.gate_extra] if m.gate_extra is not None else [])
        found += [m.router_params] if any(True for _ in m.router_params.parameters()) else []
    return found


def router_state_hook(optimizer: torch.optim.Optimizer, model: nn.Module) -> Callable[[], None]:
    """For a hand-written loop: after every ``optimizer.step()``, each stateful router of
    ``model`` (a balancing bias) updates from its layer's last training forward, as ``train``
    does. Returns a function that removes the hooks. One line, once, before the loop:

        minimoe.train.router_state_hook(optimizer, model)
    """
    layers = [m for m in moe_layers(model) if m.stateful]
    pending: dict[int, object] = {}  # layer index -> the MoEStats of its last training forward

    def remember(i: int):
        def hook(module: nn.Module, args, output) -> None:
            if module.training and torch.is_grad_enabled():
                pending[i] = output.stats

        return hook

    def update(*_) -> None:
        for i, layer in enumerate(layers):
            if i in pending:
                layer.update_router_state(pending.pop(i))

    handles = [m.register_forward_hook(remember(i)) for i, m in enumerate(layers)]
    handles.append(optimizer.register_step_post_hook(update))
    return lambda: [h.remove() for h in handles]


def _batch_violation(load: Tensor) -> float:
    """MaxVio of one step's load, NaN where no token reached an expert (undefined there)."""
    return max_violation(load) if load.sum() > 0 else float("nan")


def train(
    model: nn.Module,
    get_batch: Callable[[torch.Generator], Batch],
    config: TrainConfig,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    callback: Callable[[int, nn.Module, object], None] | None = None,
) -> History:
    """Train ``model`` for ``config.steps`` steps with AdamW; returns the History.

    ``callback(step, model, output)`` runs after every step (e.g. to record statistics).
    ``freeze_router`` freezes the routers (they stay frozen, as the GW recipe's model is);
    without it their ``requires_grad`` is left as the user set it, never switched back on.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.freeze_router:
        for r in routers(model):
            r.requires_grad_(False)
    generator = seed_everything(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = None
    start = config.start_step
    if config.lr_schedule == "cosine":  # step s (1-based) trains at lr * (1 + cos(pi (s-1)/S)) / 2
        length = max(1, config.schedule_steps or start + config.steps)  # S
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * (start + s) / length))
        )
    history = History()
    model.train()
    device = next(model.parameters()).device
    dtype = AUTOCAST[config.autocast]
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError(
            f"autocast='float16' needs a CUDA model, got device {device}; use 'bfloat16'"
        )
    # float16 gradients underflow without loss scaling; bfloat16 has float32's exponent range
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    bar = tqdm(range(1, config.steps + 1), disable=not config.progress, leave=False)
    for step in bar:
        batch = get_batch(generator)
        if not isinstance(batch, dict):
            raise TypeError(
                f"get_batch must return a dict of the model's keyword arguments "
                f"({{'idx': ..., 'targets': ...}} or {{'x': ..., 'y': ...}}), got {type(batch).__name__}"
            )
        batch = {k: v.to(device) for k, v in batch.items()}
        # the routers turn autocast off for themselves: router logits stay float32
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(**batch)
            loss = out.loss + out.aux_loss
        if not torch.isfinite(loss):  # one device sync; backward would spread it to every weight
            raise FloatingPointError(
                f"loss is {loss.item()} at step {step} (lr={config.lr}; task loss "
                f"{out.loss.item()}, aux loss {out.aux_loss.item()}): lower the learning rate, "
                "or check the batch"
            )
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, config.grad_clip)
        scaler.step(opt)
        scaler.update()
        if schedule is not None:
            schedule.step()
        # stateful routers (a balancing bias, say) update from this step's statistics, here only
        for layer, layer_out in zip(moe_layers(model), out.layers, strict=True):
            layer.update_router_state(layer_out.stats)

        history.loss.append(out.loss.item())
        history.aux_loss.append(out.aux_loss.item())
        history.experts_per_token.append([m.stats.experts_per_token.item() for m in out.layers])
        history.max_violation.append(
            [_batch_violation(m.stats.tokens_per_expert) for m in out.layers]
        )
        history.dropped_pairs.append(sum(int(m.stats.dropped_pairs) for m in out.layers))
        if callback is not None:
            callback(step, model, out)
        if evaluate is not None and config.eval_every and step % config.eval_every == 0:
            history.evals.append((step, evaluate(model)))
            model.train()
        if step % 10 == 0 or step == config.steps:
            bar.set_postfix(loss=f"{np.mean(history.loss[-10:]):.3f}")
    # a finite loss can still give non-finite gradients (overflow in backward): no NaN model out
    if params and not torch.stack([torch.isfinite(p).all() for p in params]).all():
        raise FloatingPointError(
            f"parameters are not finite after step {config.steps} (lr={config.lr}): "
            "lower the learning rate"
        )
    if evaluate is not None and (not history.evals or history.evals[-1][0] != config.steps):
        history.evals.append((config.steps, evaluate(model)))
    model.eval()
    return history


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """Evaluation-mode mean task loss and experts per token over the given batches."""
    model.eval()
    losses, ept = [], []
    device = next(model.parameters()).device
    for batch in batches:
        if not isinstance(batch, dict):
            raise TypeError(
                f"batches must hold dicts of keyword arguments, got {type(batch).__name__}"
            )
        out = model(**{k: v.to(device) for k, v in batch.items()})
        losses.append(out.loss.item())
        ept.append(np.mean([m.stats.experts_per_token.item() for m in out.layers]))
    if not losses:
        raise ValueError("mean_loss got no batches: the mean of nothing is not a loss")
    return {"loss": float(np.mean(losses)), "experts_per_token": float(np.mean(ept))}


# ---- checkpoints -------------------------------------------------------------------------


CHECKPOINT_FORMAT = 1  # {"format", "sha256", "payload"}: the torch.save bytes of the checkpoint


def _check_loadable(ckpt: dict) -> None:
    """Refuse, before any file is touched, what ``load_checkpoint`` (weights_only) would refuse:
    each extra on its own, so the error names it; then the config. The weights are tensors."""
    parts = {f"extra {k}": {k: v} for k, v in ckpt["extra"].items()}
    parts["config"] = ckpt["config"]
    for name, value in parts.items():
        buffer, saved = io.BytesIO(), False
        try:
            torch.save(value, buffer)
            saved = True
            torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        except Exception as err:  # noqa: BLE001  (pickling and weights_only raise many kinds)
            shown = value[name[6:]] if name.startswith("extra ") else value
            why = "would not load with weights_only=True" if saved else f"cannot be saved ({err})"
            raise TypeError(
                f"save_checkpoint: {name}={shown!r} ({type(shown).__name__}) {why}; use plain "
                "Python numbers, strings, lists, dicts or tensors"
            ) from err


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a minimoe checkpoint (read lazily: mmap, weights_only)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _UNREADABLE:
        return False
    return isinstance(ckpt, dict) and ("format" in ckpt or "kind" in ckpt)


def _write_checkpoint(path: Path, ckpt: dict) -> None:
    _check_loadable(ckpt)
    if path.is_dir() or (path.exists() and not _is_checkpoint(path)):
        raise FileExistsError(
            f"{path} exists and is not a minimoe checkpoint: not replacing it (delete it first)"
        )
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    raw = buffer.getvalue()
    wrapped = {
        "format": CHECKPOINT_FORMAT,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "payload": torch.frombuffer(bytearray(raw), dtype=torch.uint8),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # same folder, so os.replace is an atomic rename; a kill mid-save leaves only this file
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(wrapped, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# what torch.load raises on a damaged file (a truncated zip: OSError from its reader)
_UNREADABLE = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError)


def _read_checkpoint(path: Path, map_location: str | torch.device) -> dict:
    def load(raw: bytes, location, problem: str):
        try:
            return torch.load(io.BytesIO(raw), map_location=location, weights_only=True)
        except _UNREADABLE as err:
            raise ValueError(f"checkpoint {path} {problem}: {err}") from err

    unreadable = "cannot be read (corrupt or truncated, or not a weights_only checkpoint)"
    data = path.read_bytes()  # a missing file is a FileNotFoundError, not a corrupt one
    ckpt = load(data, "cpu", unreadable)
    if not isinstance(ckpt, dict) or not ("format" in ckpt or "kind" in ckpt):
        raise ValueError(f"{path} is not a minimoe checkpoint (no 'format' or 'kind' entry)")
    if "format" not in ckpt:  # saved before checksums: nothing to verify
        return ckpt if str(map_location) == "cpu" else load(data, map_location, unreadable)
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {ckpt['format']!r}; this minimoe reads "
            f"format {CHECKPOINT_FORMAT}"
        )
    raw = ckpt["payload"].numpy().tobytes()
    if hashlib.sha256(raw).hexdigest() != ckpt["sha256"]:
        raise ValueError(f"checkpoint {path} is corrupt: its sha256 checksum does not match")
    return load(raw, map_location, "passed its checksum but weights_only loading failed")


def save_checkpoint(model: TinyTransformer | MoERegressor, path: str | Path, **extra) -> None:
    """Save the config and weights (loadable with ``weights_only=True``), with a checksum.

    Every part must load again with ``weights_only=True`` (extras: plain numbers, strings,
    lists, dicts, tensors), or nothing is written. The file is written next to ``path`` and
    renamed over it: a failed save leaves ``path`` as it was; a file there that is not a
    checkpoint is never replaced.
    """
    if isinstance(model, TinyTransformer):
        kind, config = "transformer", model.config.to_dict()
    elif isinstance(model, MoERegressor):
        kind = "regressor"
        config = {
            "in_dim": model.head.in_features,
            "out_dim": model.head.out_features,
            "moe": model.config.to_dict(),
        }
    else:
        raise TypeError(f"cannot checkpoint a {type(model).__name__}")
    _write_checkpoint(
        Path(path),
        {"kind": kind, "config": config, "state_dict": model.state_dict(), "extra": extra},
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by ``save_checkpoint``; the file is read with weights_only=True.

    Raises ValueError if the file is corrupt or truncated. Files saved before checksums existed
    (such as the shipped data/gw_pretrained.pt) still load, unverified.
    """
    ckpt = _read_checkpoint(Path(path), map_location)
    if ckpt.get("kind") not in ("transformer", "regressor"):
        raise ValueError(
            f"checkpoint {path} has unknown kind {ckpt.get('kind')!r}; this minimoe reads "
            "transformer, regressor"
        )
    if ckpt["kind"] == "transformer":
        model: nn.Module = TinyTransformer(ModelConfig(**ckpt["config"]))
    else:
        c = ckpt["config"]
        model = MoERegressor(c["in_dim"], c["out_dim"], MoEConfig.from_dict(c["moe"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()

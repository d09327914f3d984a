"""A tiny pre-norm causal transformer with MoE feed-forward layers, and a toy regressor.

Both models return a ``ModelOutput`` whose ``loss`` is the task loss and whose
``aux_loss`` is the sum of the MoE layers' weighted auxiliary losses; the trainer adds
them. ``layers`` holds every MoE layer's full result (routing, losses, stats).

The documented tiny CPU configuration, ``ModelConfig.tiny()`` (about 0.2 M parameters),
trains a byte-level language model to a visibly falling loss in about a minute on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimoe.checks import check_float, check_int, require
from minimoe.layer import MoE, MoEConfig, MoEOutput, moe_layers
from minimoe.routing import Router


@dataclass(frozen=True)
class ModelConfig:
    """The tiny transformer's shape; frozen (change it with ``dataclasses.replace``)."""

    vocab_size: int = 256  # bytes
    block_size: int = 64  # longest sequence
    n_layers: int = 2
    n_heads: int = 4
    moe: MoEConfig = field(default_factory=MoEConfig)  # d_model lives here
    moe_every: int = 1  # MoE in every layer (1) or every other layer (2); dense FFN elsewhere
    dense_hidden: int | None = (
        None  # width of the dense FFNs; None: d_hidden * the router's k (2 without one)
    )
    num_classes: int = 0  # > 0 adds a sequence-classification head
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # rebuilt from a checkpoint
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        if not isinstance(self.moe, MoEConfig):
            raise TypeError(f"moe must be a MoEConfig, got moe={self.moe!r}")
        for name in ("vocab_size", "block_size", "n_layers", "n_heads", "moe_every"):
            check_int(name, getattr(self, name), 1)
        if self.dense_hidden is not None:
            check_int("dense_hidden", self.dense_hidden, 1)
        if self.moe_every > self.n_layers:
            raise ValueError(
                f"moe_every={self.moe_every} with n_layers={self.n_layers} builds no MoE layer "
                "(layer i is MoE when (i + 1) % moe_every == 0): moe_every must be <= n_layers"
            )
        check_int("num_classes", self.num_classes, 0)
        check_float("dropout", self.dropout, 0.0, 1.0)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @property
    def d_model(self) -> int:
        return self.moe.d_model

    @property
    def dense_width(self) -> int:
        """Width of a dense FFN layer: as many hidden units as the router's k experts."""
        if self.dense_hidden is not None:
            return self.dense_hidden
        return self.moe.d_hidden * getattr(self.moe.router, "k", 2)

    @classmethod
    def tiny(cls, **moe_overrides) -> ModelConfig:
        """2 layers, d_model 64, 8 experts of width 128, top-2: trains in about a minute on CPU."""
        moe = dict(d_model=64, d_hidden=128, num_experts=8) | moe_overrides
        return cls(n_layers=2, n_heads=4, block_size=64, moe=MoEConfig(**moe))

    def to_dict(self) -> dict:
        """Plain data for checkpoints (the router by name)."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"moe": self.moe.to_dict()}


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, L, vocab) for the LM, (B, classes) for classification, (N, out) for toy
    loss: Tensor | None  # task loss, or None without targets
    aux_loss: Tensor  # () sum of the MoE layers' weighted aux losses
    layers: list[MoEOutput]  # one per MoE layer, bottom to top


class FFN(nn.Module):
    """The dense SwiGLU feed-forward block that MoE replaces (every other layer, if asked)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, use_moe: bool):
        super().__init__()
        d = config.d_model
        self.n_heads, self.dropout = config.n_heads, config.dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        moe = config.moe
        self.ffn = MoE(moe) if use_moe else FFN(d, config.dense_width)

    def forward(
        self, x: Tensor, idx: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, MoEOutput | None]:
        """``idx`` (B, L) the token ids, for routers that route by them (hash routing); ``mask``
        (B, L) bool, False at padding, which the MoE layer leaves unrouted and uncounted."""
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)  # (B, L, d) each
        q, k, v = (
            t.view(B, L, self.n_heads, -1).transpose(1, 2) for t in (q, k, v)
        )  # (B, H, L, d/H)
        drop = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        x = x + self.proj(att.transpose(1, 2).reshape(B, L, d))
        h = self.ln2(x)
        if isinstance(self.ffn, MoE):
            moe_out = self.ffn(h, token_ids=idx, mask=mask)
            return x + moe_out.output, moe_out
        return x + self.ffn(h), None


class TinyTransformer(nn.Module):
    """Byte/token-level causal LM with MoE FFNs; ``labels`` use the classification head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.pos_emb = nn.Embedding(config.block_size, d)
        self.blocks = nn.ModuleList(
            Block(config, use_moe=(i % config.moe_every == config.moe_every - 1))
            for i in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.cls_head = nn.Linear(d, config.num_classes) if config.num_classes else None

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> ModelOutput:
        """idx (B, L) token ids; targets (B, L) next tokens (-100 = ignore); labels (B,) classes.

        ``mask`` (B, L) bool, False at padding: the MoE layers route no padding and count none
        of it in their losses and statistics, its targets are ignored and the classification
        head averages the other positions. (Attention is causal:
        padding after a sequence's end changes nothing before it.)
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, length), got {tuple(idx.shape)}")
        if idx.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        B, L = idx.shape
        if idx.device.type == "meta":
            raise ValueError(
                "idx is on the meta device: meta tensors have no token ids; build the model and "
                "its inputs on a real device (or model.to_empty(device=...))"
            )
        if B == 0 or L == 0:
            raise ValueError(f"idx is an empty batch of shape {tuple(idx.shape)}")
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one device sync, not two
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})"
            )
        if L > self.config.block_size:
            raise ValueError(f"sequence length {L} exceeds block_size={self.config.block_size}")
        if mask is not None and (not isinstance(mask, Tensor) or mask.shape != idx.shape):
            raise ValueError(
                f"mask must have idx's shape {tuple(idx.shape)}, got "
                f"{tuple(getattr(mask, 'shape', ()))}"
            )
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(L, device=idx.device))  # (B, L, d)
        layers = []
        for block in self.blocks:
            x, moe_out = block(x, idx, mask)
            if moe_out is not None:
                layers.append(moe_out)
        h = self.ln_f(x)  # (B, L, d)
        aux = sum((m.aux_loss for m in layers), h.new_zeros(()))
        if labels is not None or (self.cls_head is not None and targets is None):
            if self.cls_head is None:
                raise ValueError(
                    "labels given but the model has no classification head (num_classes=0)"
                )
            if mask is None:
                pooled = h.mean(dim=1)  # (B, d)
            else:  # the mean over each sequence's real tokens
                real = mask[..., None].to(h.dtype)  # (B, L, 1)
                pooled = (h * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)
            logits = self.cls_head(pooled)  # (B, classes)
            loss = F.cross_entropy(logits, labels) if labels is not None else None
            return ModelOutput(logits, loss, aux, layers)
        logits = self.lm_head(h)  # (B, L, vocab)
        loss = None
        if targets is not None:
            if not isinstance(targets, Tensor) or targets.shape != idx.shape:
                raise ValueError(
                    f"targets must have idx's shape {tuple(idx.shape)}, got "
                    f"{tuple(getattr(targets, 'shape', ()))}"
                )
            if mask is not None:  # padding carries no loss
                targets = targets.masked_fill(~mask, -100)
            # the mean over no token is nan: refused here, not reported as a diverged loss
            require((targets != -100).any(), "targets are all -100 (ignored): no token to score")
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return ModelOutput(logits, loss, aux, layers)


class MoERegressor(nn.Module):
    """The toy task's model: one MoE layer on the raw input, then a shared linear read-out.

    The router sees x itself, so which expert serves which cluster can be read off directly.
    """

    def __init__(self, in_dim: int, out_dim: int, moe: MoEConfig):
        super().__init__()
        if moe.d_model != in_dim:
            raise ValueError(f"moe.d_model={moe.d_model} must equal in_dim={in_dim}")
        self.config = moe
        self.moe = MoE(moe)
        self.head = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor, y: Tensor | None = None) -> ModelOutput:
        moe_out = self.moe(x)
        pred = self.head(moe_out.output)  # (N, out_dim)
        if y is not None and (not isinstance(y, Tensor) or y.shape != pred.shape):
            # mse_loss would broadcast a (N,) or (N, 1) target against (N, out_dim), with a warning
            raise ValueError(
                f"y must have the prediction's shape {tuple(pred.shape)} (out_dim="
                f"{self.head.out_features}), got {tuple(getattr(y, 'shape', ()))}"
            )
        loss = F.mse_loss(pred, y) if y is not None else None
        return ModelOutput(pred, loss, moe_out.aux_loss, [moe_out])


def set_router(model: nn.Module, router: Router, **changes) -> nn.Module:
    """Give every MoE layer of ``model`` this router (and other MoEConfig ``changes``), in place.

    Each layer gets a new frozen config (``MoE.replace_config``); the model's own config follows,
    so a checkpoint saves what the layers run. Returns the model.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer")
    for layer in layers:
        layer.replace_config(router=router, **changes)
    if isinstance(model, TinyTransformer):
        model.config = replace(model.config, moe=layers[0].config)
    elif isinstance(model, MoERegressor):
        model.config = layers[0].config
    return model

"""Matplotlib pictures of routing. Each function draws on ``ax`` (or a new figure) and returns it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes

from minimoe.analysis import load_per_expert
from minimoe.routing import Routing


def _ax(ax: Axes | None, figsize: tuple[float, float] = (5, 3)) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=figsize, layout="constrained")[1]


def plot_expert_load(
    loads: Mapping[str, Routing | torch.Tensor],
    ax: Axes | None = None,
    title: str = "Load per expert",
) -> Axes:
    """Grouped bars: share of assignments per expert, one bar group per named routing."""
    ax = _ax(ax)
    items = {
        k: (load_per_expert(v) if isinstance(v, Routing) else v.detach().float().cpu())
        for k, v in loads.items()
    }
    num_experts = len(next(iter(items.values())))
    width = 0.8 / len(items)
    for i, (name, load) in enumerate(items.items()):
        ax.bar(
            np.arange(num_experts) + (i - (len(items) - 1) / 2) * width,
            load.numpy(),
            width,
            label=name,
        )
    ax.axhline(1 / num_experts, color="k", ls="--", lw=1, label="perfect balance")
    ax.set(xlabel="expert", ylabel="share of assignments", title=title, xticks=range(num_experts))
    ax.legend(fontsize=8)
    return ax


def plot_experts_per_token(
    values: Mapping[str, Sequence[float]], ax: Axes | None = None, xlabel: str = "MoE layer"
) -> Axes:
    """Lines of mean experts per token (per layer, or per any index) for each named run."""
    ax = _ax(ax)
    for name, v in values.items():
        ax.plot(range(len(v)), v, marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel="experts per token", title="Experts per token")
    ax.legend(fontsize=8)
    return ax


def plot_routing_heatmap(
    routing: Routing,
    num_tokens: int = 48,
    ax: Axes | None = None,
    labels: Sequence[str] | None = None,
) -> Axes:
    """Combine weights of the first ``num_tokens`` tokens: tokens (rows) x experts (columns)."""
    ax = _ax(ax, figsize=(4, 6))
    w = routing.weights[:num_tokens].detach().float().cpu().numpy()
    im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set(xlabel="expert", ylabel="token", title="Combine weights", xticks=range(w.shape[1]))
    if labels is not None:
        ax.set_yticks(range(len(w)), [repr(s)[1:-1] for s in labels[:num_tokens]], fontsize=6)
    plt.colorbar(im, ax=ax, fraction=0.05)
    return ax


def smooth(values: Sequence[float], window: int = 20) -> np.ndarray:
    """Trailing moving average (shorter at the start), for readable loss curves."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_loss_curves(
    curves: Mapping[str, Sequence[float]],
    ax: Axes | None = None,
    window: int = 20,
    ylabel: str = "training loss",
) -> Axes:
    """Smoothed per-step curves, one per named run."""
    ax = _ax(ax)
    for name, v in curves.items():
        ax.plot(np.arange(1, len(v) + 1), smooth(v, window), label=name)
    ax.set(xlabel="step", ylabel=ylabel, title=ylabel.capitalize())
    ax.legend(fontsize=8)
    return ax


def plot_histograms(
    values: Mapping[str, torch.Tensor],
    ax: Axes | None = None,
    bins: int = 30,
    range_: tuple[float, float] = (0.0, 1.0),
    xlabel: str = "normalized entropy",
) -> Axes:
    """Overlaid density histograms (e.g. router entropy per layer)."""
    ax = _ax(ax)
    for name, v in values.items():
        ax.hist(
            v.detach().float().cpu().numpy(),
            bins=bins,
            range=range_,
            density=True,
            histtype="step",
            lw=1.5,
            label=name,
        )
    ax.set(xlabel=xlabel, ylabel="density")
    ax.legend(fontsize=8)
    return ax

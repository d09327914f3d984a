"""ipywidgets explorers. The numbers they show come from tested functions in analysis.py;
this file only wires sliders to them and draws."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

from minimoe.analysis import capacity_report, experts_per_token, experts_per_token_by_group
from minimoe.routing import check_logits, top_p


def _checked_logits(
    logits: Sequence[Tensor], groups: Tensor | None = None
) -> tuple[list[Tensor], Tensor | None]:
    """Per-layer (T, E) logits and (T,) groups, checked before any slider draws (an error inside
    a widget's output is easy to miss): one list of finite float tensors of one shape."""
    if isinstance(logits, Tensor) or not isinstance(logits, Sequence) or not logits:
        raise TypeError(
            f"logits must be a list of (tokens, experts) tensors, one per MoE layer, "
            f"got {type(logits).__name__}"
        )
    checked = [check_logits(lg) for lg in logits]
    shapes = {tuple(lg.shape) for lg in checked}
    if len(shapes) > 1:
        raise ValueError(f"logits of every layer must have one shape, got {sorted(shapes)}")
    if groups is not None and (
        not isinstance(groups, Tensor) or groups.shape != checked[0].shape[:1]
    ):
        raise ValueError(
            f"groups must be a ({checked[0].shape[0]},) tensor, one label per token, "
            f"got {tuple(getattr(groups, 'shape', ()))}"
        )
    return checked, groups


def explorer(draw: Callable[..., None], **controls: widgets.Widget) -> widgets.VBox:
    """Sliders above a plot; ``draw(**values)`` re-draws on every change."""
    out = widgets.interactive_output(draw, controls)
    return widgets.VBox([widgets.HBox(list(controls.values())), out])


def capacity_explorer(logits: Tensor) -> widgets.VBox:
    """Top-k with a capacity factor on recorded router logits (T, E): demand, slots, drops."""
    logits = check_logits(logits)
    num_experts = logits.shape[1]

    def draw(k: int, capacity_factor: float, dropless: bool) -> None:
        r = capacity_report(logits, k, None if dropless else capacity_factor)
        fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
        x = np.arange(num_experts)
        ax.bar(x, r.tokens_per_expert.numpy(), color="lightgray", label="routed")
        ax.bar(x, r.kept_per_expert.numpy(), color="tab:blue", label="kept")
        if r.capacity is not None:
            ax.axhline(r.capacity, color="tab:red", ls="--", label=f"capacity = {r.capacity}")
        ax.set(
            xlabel="expert",
            ylabel="tokens",
            xticks=x,
            title=f"k={k}: dropped pairs {r.dropped_pairs}, tokens with no expert {r.dropped_tokens}",
        )
        ax.legend(fontsize=8)
        plt.show()

    return explorer(
        draw,
        k=widgets.IntSlider(value=2, min=1, max=num_experts, description="k"),
        capacity_factor=widgets.FloatSlider(
            value=1.0, min=0.25, max=3.0, step=0.25, description="capacity"
        ),
        dropless=widgets.Checkbox(value=False, description="dropless"),
    )


def top_p_explorer(
    logits: Sequence[Tensor], groups: Tensor | None = None, group_names: Sequence[str] | None = None
) -> widgets.VBox:
    """Top-P on recorded router logits, one (T, E) tensor per MoE layer: experts per token per
    layer as p moves, split by ``groups`` (T,) (e.g. the task of each token) when given."""
    logits, groups = _checked_logits(logits, groups)
    num_experts = logits[0].shape[1]
    layers = np.arange(len(logits))

    def draw(p: float, rule: str) -> None:
        routings = [top_p(lg, p, rule=rule) for lg in logits]
        mean = np.mean([experts_per_token(r) for r in routings])
        fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
        if groups is None:
            ax.bar(layers, [experts_per_token(r) for r in routings], color="tab:blue")
        else:
            per_group = [
                experts_per_token_by_group(r, groups) for r in routings
            ]  # [layer] {g: ept}
            labels = sorted(per_group[0])
            width = 0.8 / len(labels)
            for i, g in enumerate(labels):
                name = group_names[g] if group_names is not None else str(g)
                ax.bar(
                    layers + (i - (len(labels) - 1) / 2) * width,
                    [pg[g] for pg in per_group],
                    width,
                    label=name,
                )
            ax.legend(fontsize=8)
        ax.axhline(2, color="k", ls=":", lw=1)  # top-2's cost
        ax.set(
            xlabel="MoE layer",
            ylabel="experts per token",
            xticks=layers,
            ylim=(0, num_experts),
            title=f"top-p, p={p:.2f} ({rule} rule): {mean:.2f} experts per token",
        )
        plt.show()

    return explorer(
        draw,
        p=widgets.FloatSlider(value=0.4, min=0.05, max=1.0, step=0.05, description="p"),
        rule=widgets.Dropdown(options=["paper", "code"], value="paper", description="rule"),
    )


def uncertainty_explorer(routings: dict[str, list]) -> widgets.VBox:
    """Share of uncertain tokens per MoE layer as the threshold moves. ``routings``: a name
    (e.g. "toy", "text") -> that model's recorded Routing per MoE layer, bottom first."""
    from minimoe.routing import normalized_entropy
    from minimoe.uncertainty import uncertain_share_per_layer

    names = [f"{name} L{i}" for name, rs in routings.items() for i in range(len(rs))]
    entropies = [normalized_entropy(r.probs) for rs in routings.values() for r in rs]

    def draw(threshold: float) -> None:
        shares = [s for rs in routings.values() for s in uncertain_share_per_layer(rs, threshold)]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3), layout="constrained")
        for name, h in zip(names, entropies):
            left.hist(
                h.numpy(), bins=30, range=(0, 1), density=True, histtype="step", lw=1.5, label=name
            )
        left.axvline(threshold, color="k", ls="--", lw=1)
        left.set(
            xlabel="normalized entropy H / ln E", ylabel="density", title="Router entropy per layer"
        )
        left.legend(fontsize=8)
        right.bar(range(len(names)), shares, color="tab:orange")
        right.set(
            xticks=range(len(names)),
            xticklabels=names,
            ylim=(0, 1),
            ylabel="share of tokens",
            title=f"uncertain: H / ln E >= {threshold:.2f}",
        )
        plt.show()

    return explorer(
        draw,
        threshold=widgets.FloatSlider(
            value=0.75, min=0.0, max=1.0, step=0.05, description="threshold"
        ),
    )


def adaptive_explorer(
    logits: Sequence[Tensor], groups: Tensor | None = None, group_names: Sequence[str] | None = None
) -> widgets.VBox:
    """Adaptive gating on recorded router logits, one (T, E) tensor per MoE layer: the share of
    tokens on two experts as the threshold T moves (raw or normalized gap), and at the chosen T
    per group of ``groups`` (T,) (e.g. each token's task; negative labels are left out)."""
    from minimoe.routing import adaptive

    logits, groups = _checked_logits(logits, groups)
    grid = np.linspace(0, 1, 41)

    def draw(threshold: float, gap: str) -> None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3), layout="constrained")
        for i, lg in enumerate(logits):
            curve = [experts_per_token(adaptive(lg, t, gap=gap)) - 1 for t in grid]  # share on two
            left.plot(grid, curve, label=f"layer {i}")
        routings = [adaptive(lg, threshold, gap=gap) for lg in logits]
        share = np.mean([experts_per_token(r) - 1 for r in routings])
        left.axvline(threshold, color="k", ls="--", lw=1)
        left.axhspan(0.11, 0.26, color="tab:green", alpha=0.15, label="paper: 11-26%")
        left.set(
            xlabel="threshold T",
            ylabel="share on two experts",
            ylim=(0, 1),
            title=f"{gap} gap, T={threshold:.2f}: {share:.0%} on two, FLOPs {(1 + share) / 2:.2f}x top-2",
        )
        left.legend(fontsize=8)
        if groups is not None:
            per_group = [
                experts_per_token_by_group(r, groups) for r in routings
            ]  # [layer] {g: ept}
            labels = [g for g in sorted(per_group[0]) if g >= 0]
            names = [group_names[g] if group_names is not None else str(g) for g in labels]
            right.bar(
                names,
                [np.mean([pg[g] - 1 for pg in per_group]) for g in labels],
                color="tab:orange",
            )
            right.set(
                ylabel="share on two experts", ylim=(0, 1), title="by group, mean over layers"
            )
        else:
            right.axis("off")
        plt.show()

    return explorer(
        draw,
        threshold=widgets.FloatSlider(value=0.1, min=0.0, max=1.0, step=0.01, description="T"),
        gap=widgets.Dropdown(options=["raw", "normalized"], value="raw", description="gap"),
    )

"""ipywidgets explorers. The numbers they show come from tested functions in analysis.py;
this file only wires sliders to them and draws."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

from minimoe.analysis import capacity_report


def explorer(draw: Callable[..., None], **controls: widgets.Widget) -> widgets.VBox:
    """Sliders above a plot; ``draw(**values)`` re-draws on every change."""
    out = widgets.interactive_output(draw, controls)
    return widgets.VBox([widgets.HBox(list(controls.values())), out])


def capacity_explorer(logits: Tensor) -> widgets.VBox:
    """Top-k with a capacity factor on recorded router logits (T, E): demand, slots, drops."""
    num_experts = logits.shape[1]

    def draw(k: int, capacity_factor: float, dropless: bool) -> None:
        r = capacity_report(logits, k, None if dropless else capacity_factor)
        fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
        x = np.arange(num_experts)
        ax.bar(x, r.tokens_per_expert.numpy(), color="lightgray", label="routed")
        ax.bar(x, r.kept_per_expert.numpy(), color="tab:blue", label="kept")
        if r.capacity is not None:
            ax.axhline(r.capacity, color="tab:red", ls="--", label=f"capacity = {r.capacity}")
        ax.set(xlabel="expert", ylabel="tokens", xticks=x,
               title=f"k={k}: dropped pairs {r.dropped_pairs}, tokens with no expert {r.dropped_tokens}")
        ax.legend(fontsize=8)
        plt.show()

    return explorer(
        draw,
        k=widgets.IntSlider(value=2, min=1, max=num_experts, description="k"),
        capacity_factor=widgets.FloatSlider(value=1.0, min=0.25, max=3.0, step=0.25, description="capacity"),
        dropless=widgets.Checkbox(value=False, description="dropless"),
    )

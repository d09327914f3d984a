"""Chapter 8: routing since 2024 (``python -m course modern``): sigmoid scores balanced by an
auxiliary loss or by a bias with no loss (Wang et al. 2024, DeepSeek-V3), expert choice, shared
and fine-grained experts, on chapter 1's tiny byte-level language model (``course.lm.ByteLM``),
on the experiment harness.

For every seed all runs start from the same weights (a shared expert and the router of the
fine-grained model are drawn fresh; fine-grained experts are the coarse ones cut into pieces)
and see the same batches in the same order; the learning rate decays to zero, so every run ends
where it stops improving; no run has a capacity limit. Sigmoid runs train without the z-loss, as
in Wang et al. Balance is measured as MaxVio = (max load - mean load) / mean load: MaxVio_batch
per training step (the mean over the last quarter of the steps), MaxVio_global over the held-out
set. ``causal_leak`` measures how much the earlier positions of a window change when only its
last bytes change: 0 for a causal router.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from torch import Tensor, nn

from course import harness
from course.harness import Run
from course.lm import ByteLM, LMSetup
from minimoe.analysis import RoutingRecorder, expert_count_shares, experts_per_token, max_violation
from minimoe.data import Batch
from minimoe.families import FAMILIES
from minimoe.layer import moe_layers
from minimoe.routing import ExpertChoice, HashTopK, Routing, SigmoidTopK
from minimoe.train import History
from minimoe.zoo_table import describe

U = 1e-2  # our bias rate: Wang et al.'s u = 1e-3 moves the bias 1.2 at most in 1200 steps
M = 4  # fine-grained: every expert cut into M, M times as many chosen
H = LMSetup().d_hidden


def sigmoid(alpha: float = 0.0, moe: dict | None = None, **router) -> Run:
    """A SigmoidTopK run (bias frozen unless ``bias_rate``), no z-loss, and Wang et al.'s balance
    loss alpha * sum_i f_i P_i, f_i = E / (k T) * tokens choosing i: the library's loss counting
    every selected expert, divided by k; ``moe``: other MoEConfig changes."""
    spec = SigmoidTopK(**({"bias_rate": 0.0} | router))
    loss = {"z_coef": 0.0, "balance_coef": alpha / spec.k} | (
        {"balance_count": "selected"} if alpha else {}
    )
    return Run(spec, losses="course", moe=loss | (moe or {}))


# "shared": a shared expert as wide as a routed one; fine-grained: E M experts of width h / M,
# k M chosen, the routed output scaled by M (the renormalized k M weights are 1 / M of the
# coarse ones each: unscaled, the routed output starts at about 1 / M of the coarse model's)
SHARED = {"shared_hidden": H}
FINE = {"num_experts": LMSetup().num_experts * M, "d_hidden": H // M}
RUNS: dict[str, Run] = {
    "no balancing": sigmoid(),
    "aux 1e-3": sigmoid(1e-3),  # Wang et al.'s baseline alpha
    "aux 1e-2": sigmoid(1e-2),  # the course's alpha
    "seq aux 1e-3": sigmoid(moe={"seq_balance_coef": 1e-3}),  # DeepSeek-V3's sequence-wise loss
    "loss-free 1e-3": sigmoid(bias_rate=1e-3),  # the paper's u
    "loss-free 1e-2": sigmoid(bias_rate=U),
    "loss-free 1e-1": sigmoid(bias_rate=1e-1),  # too large
    "loss-free + seq": sigmoid(bias_rate=U, moe={"seq_balance_coef": 1e-4}),  # DeepSeek-V3's
    "softmax aux 1e-3": sigmoid(1e-3, score="softmax"),  # Wang et al.'s softmax ablation
    "softmax loss-free": sigmoid(score="softmax", bias_rate=U),
    "expert choice": Run(ExpertChoice(capacity_factor=2.0), losses="paper", moe={"z_coef": 0.0}),
    # k=1: renormalized, g = s / s = 1 would give the router no gradient
    "shared + top-1": sigmoid(k=1, renormalize=False, bias_rate=U, moe=SHARED),
    "gated shared + top-1": sigmoid(  # Qwen2-MoE's sigmoid gate on the shared expert
        k=1, renormalize=False, bias_rate=U, moe=SHARED | {"shared_gate": True}
    ),
    "fine-grained": sigmoid(k=2 * M, bias_rate=U, scaling=float(M), moe=FINE),
    "fine-grained unscaled": sigmoid(k=2 * M, bias_rate=U, moe=FINE),
    # does learning the router matter? Each byte's two experts are a fixed draw (DeepSeek-V4's
    # hash layers: a token id -> experts table, the same for every seed); the sigmoid scores of
    # the two only weigh them, renormalized as in the top-2 runs; no balancing
    "hash": Run(HashTopK(k=2, score="sigmoid"), losses="paper"),
}
BALANCING = list(RUNS)[:10]  # the top-2 runs that differ only in how they balance
BASE = "loss-free 1e-2"  # the top-2 that expert choice, shared and fine-grained are compared with
# the run each one's held-out loss is paired with (the papers' comparisons); the others: BASE
VERSUS = dict.fromkeys(
    [
        "no balancing",
        "aux 1e-3",
        "aux 1e-2",
        "loss-free 1e-3",
        "loss-free 1e-2",
        "softmax aux 1e-3",
    ],
    "aux 1e-3",
) | {
    "softmax loss-free": "softmax aux 1e-3",
    "gated shared + top-1": "shared + top-1",
    "fine-grained unscaled": "fine-grained",
}


def versus(name: str) -> str:
    return VERSUS.get(name, BASE)


def family() -> list[tuple[str, str, str]]:
    """The chapter's comparisons of held-out loss: every run against the run it is paired
    with, and the bias against the course's stronger auxiliary loss."""
    pairs = [(n, versus(n), "loss") for n in RUNS if versus(n) != n]
    return pairs + [("loss-free 1e-2", "aux 1e-2", "loss")]


def split_experts(gate_up: torch.Tensor, down: torch.Tensor, m: int) -> tuple[torch.Tensor, ...]:
    """SwiGLU experts (E, 2h, d), (E, d, h) cut into m E experts of width h / m, so that the m
    pieces of expert e (e m, ..., e m + m - 1) sum to it: y = sum over hidden units."""
    E, two_h, d = gate_up.shape
    h = two_h // 2
    gate, up = gate_up.view(E, 2, m, h // m, d).unbind(1)  # (E, m, h/m, d) each
    pieces = torch.cat([gate, up], dim=2).reshape(E * m, 2 * h // m, d)
    return pieces, down.view(E, d, m, h // m).transpose(1, 2).reshape(E * m, d, h // m)


# ---- measures ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> tuple[dict[str, float], dict]:
    """Held-out loss (nats per byte) and accuracy; MaxVio_global (over all the held-out tokens,
    mean over layers), experts per token and the share of (token, layer) pairs routed to no
    expert; and, beside them, MaxVio_global per layer and the shares of pairs routed to 0, 1,
    2, ... experts."""
    model.eval()
    device = next(model.parameters()).device
    loss = correct = tokens = 0.0
    with RoutingRecorder(model) as rec:
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            out = model(**b)
            loss += out.loss.item() * b["targets"].numel()
            correct += (out.logits.argmax(-1) == b["targets"]).sum().item()
            tokens += b["targets"].numel()
    routings = [rec.routing(i) for i in range(len(rec))]
    counts = expert_count_shares(Routing.cat(routings))  # over every (token, layer) pair
    per_layer = [max_violation(r) for r in routings]
    measures = {
        "loss": loss / tokens,
        "accuracy": correct / tokens,
        "maxvio_global": statistics.fmean(per_layer),
        "experts_per_token": statistics.fmean(experts_per_token(r) for r in routings),
        "unrouted": counts.get(0, 0.0),
    }
    return measures, {"maxvio_global_layers": per_layer, "expert_counts": list(counts.values())}


@torch.no_grad()
def causal_leak(model: nn.Module, batch: Batch, positions: int = 1) -> dict[str, float]:
    """Replace the last ``positions`` bytes of every window (by bytes of the batch drawn at
    random) and compare the earlier positions, whose inputs did not change, in evaluation mode:
    ``leak_loss`` the mean |change| of their loss, ``leak_logits`` the largest |change| of a
    logit, ``leak_routes`` the share of their (token, layer) expert sets that changed. All 0 for
    a causal model."""
    model.eval()
    device = next(model.parameters()).device
    idx, targets = batch["idx"].to(device), batch["targets"].to(device)
    changed = idx.clone()
    pick = torch.randint(
        idx.numel(), (idx.shape[0], positions), generator=torch.Generator().manual_seed(0)
    )
    changed[:, -positions:] = idx.flatten()[pick.to(device)]
    a, b = model(idx=idx), model(idx=changed)
    B, L = idx.shape
    early = slice(0, L - positions)

    def losses(out):  # (B, L - positions)
        logits = out.logits[:, early]
        return F.cross_entropy(logits.transpose(1, 2), targets[:, early], reduction="none")

    def changed_routes(x, y) -> float:  # (B, L, E) masks: share of earlier expert sets changed
        return (x.mask != y.mask).view(B, L, -1)[:, early].any(-1).float().mean().item()

    return {
        "leak_loss": (losses(a) - losses(b)).abs().mean().item(),
        "leak_logits": (a.logits[:, early] - b.logits[:, early]).abs().max().item(),
        "leak_routes": statistics.fmean(
            changed_routes(x.routing, y.routing) for x, y in zip(a.layers, b.layers)
        ),
    }


@dataclass
class Trace:
    """Training callback: each step's share of unrouted (token, layer) pairs; every ``every``
    steps each layer's balancing bias (stateful routers only)."""

    every: int
    unrouted: list[float] = field(default_factory=list)
    bias: list[list[list[float]]] = field(default_factory=list)  # [point][layer][expert]

    def __call__(self, step: int, model: nn.Module, out) -> None:
        tokens = out.layers[0].routing.num_tokens * len(out.layers)
        self.unrouted.append(sum(m.stats.unrouted_tokens.item() for m in out.layers) / tokens)
        layers = moe_layers(model)
        if step % self.every == 0 and hasattr(layers[0].router_state, "bias"):
            self.bias.append([m.router_state.bias.tolist() for m in layers])


def window_means(values: list[float], every: int) -> list[float]:
    return [round(statistics.fmean(values[i : i + every]), 4) for i in range(0, len(values), every)]


RECORD_EVERY = 20  # trajectory points: MaxVio_batch and training loss, averaged
BIAS_EVERY = 40  # trajectory points of the balancing bias


class Modern(ByteLM):
    name = "modern"
    help = "chapter 8: loss-free balancing, expert choice, shared and fine-grained experts"
    runs = RUNS

    def initial_weights(self, base: dict[str, Tensor], own: dict[str, Tensor]) -> dict:
        """The base draw wherever the shapes agree (``ByteLM``); fine-grained experts are its
        experts cut into pieces (``split_experts``); a shared expert and the fine-grained router
        keep the model's own seeded draw."""
        load = super().initial_weights(base, own)
        for key in [k for k in base if k.endswith("experts.gate_up")]:
            m = own[key].shape[0] // base[key].shape[0]
            if m > 1:
                down = key.replace("gate_up", "down")
                load[key], load[down] = split_experts(base[key], base[down], m)
        return load

    def evaluate(self, model: nn.Module, held_out: list[Batch]) -> dict[str, float]:
        measures, self._beside = evaluate(model, held_out)  # the last call's: ``extra`` keeps it
        return measures

    def recorder(self, name: str) -> Trace:
        return Trace(BIAS_EVERY)

    def extra(self, model: nn.Module, held_out, history: History, record: Trace) -> dict:
        """MaxVio_batch (mean over layers and the last quarter of the steps) and its trajectory,
        the training loss's, the share of unrouted training tokens, MaxVio_global per layer, the
        shares of expert counts, the bias trajectory, the causal leak, and the training step's
        time relative to a fresh BASE model's (interleaved)."""
        batch_vio = [statistics.fmean(v) for v in history.max_violation]  # mean over layers
        last = batch_vio[-max(1, len(batch_vio) // 4) :]
        beside = self._beside  # of the final evaluation, which the trainer runs last
        times = self.time_against(model, BASE)
        steps = len(history.loss)
        return {
            "maxvio_batch": statistics.fmean(last),
            "train_unrouted": statistics.fmean(record.unrouted),
            **causal_leak(model, held_out[0]),
            "step_ratio": times["step_ratio"],
            "curves": {
                "steps": list(range(RECORD_EVERY, steps + 1, RECORD_EVERY)),
                "maxvio_batch": window_means(batch_vio, RECORD_EVERY),
                "train_loss": window_means(history.loss, RECORD_EVERY),
                "bias_steps": list(range(BIAS_EVERY, steps + 1, BIAS_EVERY)),
                "bias": [[[round(b, 4) for b in layer] for layer in p] for p in record.bias]
                or None,
            }
            | {k: [round(v, 5) for v in vs] for k, vs in beside.items()},
        }


def load(path=None) -> harness.Results:
    """The cached comparison (data/modern/), checked against the declared runs."""
    return harness.load(Modern(), path)


SCALARS = "maxvio_batch train_unrouted leak_loss leak_logits leak_routes".split()


def summary(results: harness.Results) -> list[dict]:
    """Per run (declared order): its partner (``versus``; itself if the partner was not run), the mean over seeds of every measure
    and of the scalar extras, the training step's time relative to BASE's (``step_ratio``: the
    mean of the per-seed medians), and the standard deviation over seeds (``*_std``) of the
    loss, the paired difference ``loss_vs`` and the two MaxVio."""
    rows = []
    for run in [n for n in RUNS if n in results.runs]:
        seeds = results.seeds_of(run)
        records = [results.record(run, s) for s in seeds]
        partner = versus(run) if versus(run) in results.runs else run  # itself: not run
        row = {"run": run, "versus": partner}
        for key in [*records[0]["measures"], *SCALARS]:
            values = results.values(run, key, seeds)
            row[key] = statistics.fmean(values)
            if key in ("loss", "maxvio_batch", "maxvio_global"):
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        diffs = results.differences(run, partner, "loss")
        row["loss_vs"] = statistics.fmean(diffs)
        row["loss_vs_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        row["step_ratio"] = statistics.fmean(r["extra"]["step_ratio"]["median"] for r in records)
        rows.append(row)
    return rows


def curves(results: harness.Results, run: str, seed: int) -> dict:
    """Run ``run``'s training trajectories on ``seed`` (``Modern.extra``'s ``curves``)."""
    return results.record(run, seed)["extra"]["curves"]


def plot_maxvio(results: harness.Results, names: list[str], ax: Axes | None = None) -> Axes:
    """MaxVio_batch during training (mean over layers, seeds and ``RECORD_EVERY`` steps)."""
    ax = ax if ax is not None else plt.subplots(figsize=(6, 3.5), layout="constrained")[1]
    for name in names:
        per_seed = [curves(results, name, s) for s in results.seeds_of(name)]
        mean = [statistics.fmean(v) for v in zip(*(c["maxvio_batch"] for c in per_seed))]
        ax.plot(per_seed[0]["steps"], mean, label=name)
    ax.set(
        xlabel="training step", ylabel="MaxVio_batch", ylim=(0, None), title="Balance in training"
    )
    ax.legend(fontsize=7, ncols=2)
    return ax


def plot_bias(curves: dict, layer: int = 0, ax: Axes | None = None) -> Axes:
    """One run's bias per expert during training (``curves``: a run's curves of one seed)."""
    ax = ax if ax is not None else plt.subplots(figsize=(5, 3.5), layout="constrained")[1]
    bias = torch.tensor(curves["bias"])[:, layer]  # (points, E)
    steps = [0] + curves["bias_steps"]
    ax.plot(steps, torch.cat([torch.zeros(1, bias.shape[1]), bias]).numpy(), lw=1)
    ax.set(xlabel="training step", ylabel=f"bias b_i (layer {layer})")
    return ax


def plot_bars(summary: list[dict], column: str, ax: Axes | None = None) -> Axes:
    """One bar per run (the mean over seeds), from zero; error bars: the std over seeds."""
    ax = ax if ax is not None else plt.subplots(figsize=(7, 3.5), layout="constrained")[1]
    names = [r["run"] for r in summary]
    err = [r.get(f"{column}_std", 0.0) for r in summary]
    ax.bar(names, [r[column] for r in summary], yerr=err, capsize=3, color="C0")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel(column)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    return ax


def print_table(summary: list[dict]) -> None:
    print(
        f"{'run':>20} {'loss':>6} {'vs':>16} {'':>16} {'MaxVio b':>8} {'MaxVio g':>8} "
        f"{'exp/tok':>7} {'unrouted':>8} {'leak':>6} {'step':>5}"
    )
    for r in summary:
        print(
            f"{r['run']:>20} {r['loss']:>6.3f} {r['versus']:>16} {r['loss_vs']:>+7.4f} ± "
            f"{r['loss_vs_std']:.4f} {r['maxvio_batch']:>8.3f} {r['maxvio_global']:>8.3f} "
            f"{r['experts_per_token']:>7.2f} {r['unrouted']:>8.1%} {r['leak_loss']:>6.4f} "
            f"{r['step_ratio']:>5.2f}"
        )


# ---- what the models of 2025-2026 route with (rows of the zoo table) ------------------------

RECENT = {  # a family of minimoe.families -> where its release describes it
    "Qwen3-MoE": "Qwen3 Technical Report, arXiv 2505.09388",
    "Qwen3-Next": "model card Qwen/Qwen3-Next-80B-A3B-Instruct",
    "gpt-oss": "gpt-oss model card, arXiv 2508.10925",
    "Llama-4": "model card meta-llama/Llama-4-Scout-17B-16E",
    "GLM-4-MoE": "GLM-4.5, arXiv 2508.06471",
    "dots.llm1": "dots.llm1 Technical Report, arXiv 2506.05767",
    "ERNIE-4.5-MoE": "ERNIE 4.5 Technical Report (Baidu), model card baidu/ERNIE-4.5-21B-A3B-PT",
    "LongCat-Flash": "LongCat-Flash Technical Report, arXiv 2509.01322",
    "MiniMax-M2": "model card MiniMaxAI/MiniMax-M2",
    "Kimi-Linear": "Kimi Linear, arXiv 2510.26692",
    "DeepSeek-V3.2": "DeepSeek-V3.2, arXiv 2512.02556",
    "DeepSeek-V4": "DeepSeek-V4 technical report, model card deepseek-ai/DeepSeek-V4-Pro",
    "Granite-MoE-Hybrid": "model card ibm-granite/granite-4.0-h-small",
}
RECENT_COLUMNS = (
    "family", "score", "selection", "normalization", "bias", "groups", "shared expert",
    "null / identity experts", "HF balance loss",
)  # fmt: skip


def recent_routers() -> list[dict[str, str]]:
    """``RECENT``'s rows of the zoo table (``minimoe.zoo_table.describe`` of the family table),
    ``RECENT_COLUMNS`` and the reference of each."""
    by_name = {f.name: f for f in FAMILIES}
    rows = []
    for name, reference in RECENT.items():
        row = describe(by_name[name])
        rows.append({c: row[c] for c in RECENT_COLUMNS} | {"reference": reference})
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    """Rows of equal keys as a Markdown table (a "|" inside a value becomes "/")."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    cells = [[r[k].replace("|", "/") for k in keys] for r in rows]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def add_parser(sub) -> None:
    Modern().add_parser(sub)

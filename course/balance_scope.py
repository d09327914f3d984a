"""Where the balance loss averages (``python -m course balance_scope``), on the known-answer
testbed: chapter 8's question of Qwen3's global-batch balancing (Qiu et al., arXiv 2501.11873).

The balance loss L_b = E sum_i f_i Q_i asks for an even load over the tokens it averages over.
Over a whole batch of mixed inputs that costs a specialized router nothing; over a group of
inputs of one kind (a sequence of code, say) it asks the router to spread that kind over every
expert, which is the opposite of specializing. Training frameworks compute it per micro-batch, a
few sequences; Qwen3 gathers f over the global batch.

The task is ``TestbedDirichlet``'s (8 functions; a level-m input mixes m of them with drawn
weights and its tag names them), served in **domains**: a training step is 16 sequences of 16
inputs, every input of a sequence uses one function c drawn for that sequence, and the step is
8 micro-batches of 2 sequences (gradient accumulation, here in one forward: the task loss is the
same either way). The model is two MoE layers with residual connections on the raw input
(``StackedRegressor``: two, so that pooling over layers means something), 8 SwiGLU experts of
width 32 each, top-2 renormalized, dropless, no z-loss; every run of a seed starts from the same
weights and sees the same batches. Only the balance loss differs (``Scope``), always counting
the k selected experts, alpha = 1e-2:

- over the step's whole batch (the global batch), per layer, f divided by k: the reference;
- per micro-batch (what frameworks do), per sequence, and accumulated over the micro-batches in
  order (``accumulated_balance_loss``: gradient accumulation's approximation of the global f);
- pooled over the two layers before the product (Hugging Face's ``load_balancing_loss_func``);
- f not divided by k (Hugging Face's: k at balance, so alpha counts twice);
- no balance loss (the control: does anything need balancing here?).

Measured on the testbed's test set every 200 steps: the relative error (overall and per level),
**specialization** (per layer: each expert's share of the level-1 test inputs it takes first
that come from its most frequent function, weighted by how many it takes, i.e. the purity of the
first choices; 1 when every expert serves one function; the mean over layers), MaxVio over all
test inputs, and MaxVio within a domain (over the test inputs that use function c, mean over c):
what a per-sequence loss evens out.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from course import harness, stats
from course.harness import Run
from course.testbed import LEVELS, Testbed, TestbedSetup
from minimoe.analysis import first_choice, max_violation
from minimoe.checks import check_choice
from minimoe.data import MixtureTask
from minimoe.layer import MoE, MoEConfig
from minimoe.losses import accumulated_balance_loss, load_balance_loss
from minimoe.model import ModelOutput
from minimoe.routing import Routing, TopK

OVER = ("batch", "micro-batch", "sequence", "accumulated")
LAYERS = ("each", "pooled")


@dataclass(frozen=True)
class Scope:
    """Where the balance loss averages: ``over`` which tokens (the step's whole batch, each
    micro-batch, each sequence, or the micro-batches in order with f accumulated), ``layers``
    (``"each"``: a loss per layer, their mean; ``"pooled"``: all layers' tokens in one product),
    ``per_k`` (f divided by k: 1 at balance), and its coefficient ``alpha`` (0: none)."""

    over: str = "batch"
    layers: str = "each"
    per_k: bool = True
    alpha: float = 1e-2

    def __post_init__(self) -> None:
        check_choice("over", self.over, OVER)
        check_choice("layers", self.layers, LAYERS)

    def loss(self, routings: list[Routing], seq_len: int, micro_batch: int, k: int) -> Tensor:
        """alpha L_b over the layers' routings of one step (tokens in sequence order)."""
        probs = torch.stack([r.probs for r in routings])  # (layers, T, E)
        masks = torch.stack([r.mask for r in routings])  # (layers, T, E)
        # tokens per group: all, one sequence, or one micro-batch (accumulated: in order)
        n = {"batch": probs.shape[1], "sequence": seq_len}.get(self.over, micro_batch * seq_len)
        if self.layers == "pooled":  # each group's tokens of every layer side by side
            L, T, E = probs.shape
            probs, masks = (
                t.view(L, T // n, n, E).transpose(0, 1).reshape(1, -1, E) for t in (probs, masks)
            )
            n *= L
        if self.over == "accumulated":
            per_layer = [
                accumulated_balance_loss(p, m, "selected", micro_batch=n)
                for p, m in zip(probs, masks)
            ]
        else:
            per_layer = [
                load_balance_loss(p, m, "selected", group_size=n) for p, m in zip(probs, masks)
            ]
        loss = torch.stack(per_layer).mean()
        return self.alpha * loss / (k if self.per_k else 1)


@dataclass(frozen=True)
class ScopedRun(Run):
    """A run of this experiment: its router and MoEConfig changes, and its balance loss."""

    scope: Scope = field(default_factory=Scope)


ROUTER = TopK(k=2)
RUNS: dict[str, ScopedRun] = {
    name: ScopedRun(ROUTER, losses="course", moe={"balance_coef": 0.0, "z_coef": 0.0}, scope=s)
    for name, s in {
        "global batch": Scope(),
        "micro-batch": Scope(over="micro-batch"),
        "sequence": Scope(over="sequence"),
        "accumulated": Scope(over="accumulated"),
        "pooled layers": Scope(layers="pooled"),
        "not / k": Scope(per_k=False),
        "no balance": Scope(alpha=0.0),
    }.items()
}
REFERENCE = "global batch"
MEASURES = {"specialization": False, "rel_error": True}  # measure -> lower is better
# the experiment's family: every run against the reference, on both measures
FAMILY = [(run, REFERENCE, m) for m in MEASURES for run in RUNS if run != REFERENCE]


@dataclass
class ScopeSetup(TestbedSetup):
    """``TestbedDirichlet``'s task and sizes, two MoE layers, batches of domains."""

    mixing: str = "dirichlet"
    n_layers: int = 2
    seq_len: int = 16  # inputs per sequence (one domain each)
    micro_batch: int = 2  # sequences per micro-batch


class StackedRegressor(nn.Module):
    """``n_layers`` MoE layers on the raw input, each added to its input (a residual), then a
    linear read-out; its aux loss is the scope's balance loss over the layers' routings."""

    def __init__(
        self, in_dim: int, out_dim: int, moe: MoEConfig, n_layers: int, scope: Scope, setup
    ):
        super().__init__()
        self.config, self.scope = moe, scope
        self.seq_len, self.micro_batch = setup.seq_len, setup.micro_batch
        self.layers = nn.ModuleList(MoE(moe) for _ in range(n_layers))
        self.head = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor, y: Tensor | None = None) -> ModelOutput:
        h, outs = x, []
        for layer in self.layers:  # x: (S, L, d) sequences in training, (N, d) when measured
            out = layer(h)
            h = h + out.output
            outs.append(out)
        pred = self.head(h)
        loss = F.mse_loss(pred, y) if y is not None else None
        aux = pred.new_zeros(())
        if self.training and self.scope.alpha:
            routings = [o.routing for o in outs]
            aux = self.scope.loss(routings, self.seq_len, self.micro_batch, self.config.router.k)
        return ModelOutput(pred, loss, aux, outs)


def domain_batches(task: MixtureTask, sequences: int, seq_len: int):
    """``get_batch(generator)``: ``sequences`` sequences of ``seq_len`` inputs, (S, L, d); each
    sequence draws a function c, then its inputs from those that use c."""
    C = task.member.shape[1]
    using = [task.member[:, c].nonzero().squeeze(1) for c in range(C)]  # inputs of each function

    def get(g: torch.Generator) -> dict[str, Tensor]:
        domains = torch.randint(0, C, (sequences,), generator=g).tolist()
        idx = torch.stack(
            [using[c][torch.randint(0, len(using[c]), (seq_len,), generator=g)] for c in domains]
        )  # (S, L)
        return {"x": task.x[idx], "y": task.y[idx]}

    return get


def first_choices(routing: Routing, test: MixtureTask) -> Tensor:
    """(E, C): how many level-1 test inputs of function c each expert takes first."""
    one = test.level == 1
    funcs = test.member[one].float().argmax(1)  # (N1,) the function of each level-1 input
    first = first_choice(routing)[one]  # (N1,)
    counts = torch.zeros(routing.num_experts, test.member.shape[1])  # (E, C)
    return counts.index_put_((first, funcs), torch.ones(len(first)), accumulate=True)


def purity(counts: Tensor) -> float:
    """(E, C) counts -> for each expert, the share of its inputs from its most frequent function,
    weighted by how many it takes (1: every expert serves one function)."""
    return (counts.max(dim=1).values.sum() / counts.sum()).item()


def specialization(routing: Routing, test: MixtureTask) -> float:
    """Purity of the first choices of the level-1 inputs: for each expert, the share of the
    level-1 inputs it takes first that come from its most frequent function, weighted by how
    many it takes (1: every expert serves one function; 1/C: every expert serves all alike)."""
    return purity(first_choices(routing, test))


def domain_violation(routing: Routing, test: MixtureTask) -> float:
    """MaxVio of the selected load within each domain (the test inputs that use function c),
    the mean over c: how evenly a sequence of one kind is spread over the experts."""
    C = test.member.shape[1]
    return statistics.fmean(max_violation(routing.mask[test.member[:, c]].sum(0)) for c in range(C))


@torch.no_grad()
def measure(model: StackedRegressor, test: MixtureTask) -> dict[str, float]:
    """Relative error (overall, per level), specialization (mean over layers, and each layer's),
    MaxVio over the test set and within a domain (means over layers)."""
    model.eval()
    out = model(test.x.to(next(model.parameters()).device))
    err = (out.logits.cpu() - test.y).pow(2).mean(1)  # (N,)
    routings = [o.routing.to("cpu") for o in out.layers]  # beside the test set's labels
    per_layer = [specialization(r, test) for r in routings]
    measures = {"rel_error": (err.mean() / test.y.var(0).mean()).item()}
    for m in LEVELS:
        at = test.level == m
        measures[f"rel_error@{m}"] = (err[at].mean() / test.y[at].var(0).mean()).item()
    measures["specialization"] = statistics.fmean(per_layer)
    measures |= {f"specialization_layer{i}": v for i, v in enumerate(per_layer)}
    measures["maxvio_global"] = statistics.fmean(max_violation(r) for r in routings)
    measures["maxvio_domain"] = statistics.fmean(domain_violation(r, test) for r in routings)
    return measures


class BalanceScope(Testbed):
    """The testbed's test set, base MoE, seeds and evaluation period; its own batches (served in
    domains), model (stacked layers) and measures."""

    name = "balance_scope"
    help = "chapter 8: where the balance loss averages (batch, micro-batch, sequence, layers, k)"
    setup_class = ScopeSetup
    runs = RUNS

    def data(self, seed: int):
        s = self.setup
        if s.batch_size % (s.seq_len * s.micro_batch):
            raise ValueError(
                f"batch_size={s.batch_size} must be a whole number of micro-batches of "
                f"micro_batch={s.micro_batch} sequences of seq_len={s.seq_len}"
            )
        return domain_batches(
            s.train_set(seed), s.batch_size // s.seq_len, s.seq_len
        ), self.test_set

    def build(self, run: ScopedRun, seed: int) -> StackedRegressor:
        """The seed's weights (the same for every run), with the run's balance loss."""
        moe = run.moe_config(self.base_moe())
        torch.manual_seed(seed)
        d, out = moe.d_model, self.test_set.y.shape[1]
        return StackedRegressor(d, out, moe, self.setup.n_layers, run.scope, self.setup)

    def declared(self) -> dict[str, dict]:
        """Every run's config as data, its balance scope included."""
        declared = super().declared()
        for name, run in self.runs.items():
            declared[name]["scope"] = asdict(run.scope)
        return declared

    def evaluate(self, model: StackedRegressor, held_out: MixtureTask) -> dict[str, float]:
        return measure(model, held_out)

    @torch.no_grad()
    def extra(self, model: StackedRegressor, held_out: MixtureTask, history, record) -> dict:
        """Per layer, the (E, C) counts of level-1 test inputs each expert takes first."""
        model.eval()
        out = model(held_out.x.to(next(model.parameters()).device))
        routings = [o.routing.to("cpu") for o in out.layers]  # beside the test set's labels
        return {"first_choices": [first_choices(r, held_out).tolist() for r in routings]}


def load(path=None) -> harness.Results:
    """The cached results (``data/balance_scope``), checked against the declared runs."""
    return harness.load(BalanceScope(), path)


def family(results: harness.Results) -> list[stats.Comparison]:
    """``FAMILY`` judged together (Holm), each measure on its own side (higher specialization,
    lower error is better)."""
    return stats.holm([results.compare(a, b, m, MEASURES[m]) for a, b, m in FAMILY])


def add_parser(sub) -> None:
    BalanceScope().add_parser(sub)

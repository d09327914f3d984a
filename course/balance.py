"""Chapter 1's language-model runs (``python -m course balance``): what the balance loss costs,
and the dense FFN the MoE replaces.

On chapter 6's byte-level model (``course.lm``), five seeds, 1200 cosine-decayed steps: Switch
top-1 and Mixtral top-2, each with the Switch balance loss (alpha 1e-2) and without it, and two
dense baselines, each an FFN in every layer (a one-expert MoE: its weight is 1, it has no
balance loss): at top-2's active FLOPs (width 2h) and at the MoE's total expert parameters
(width E h). No router z-loss, no capacity limit.
"""

from __future__ import annotations

from course.harness import Run
from course.lm import ByteLM, LMSetup
from minimoe.routing import TopK

SWITCH, MIXTRAL = TopK(k=1, renormalize=False), TopK(k=2)
DENSE = TopK(k=1, renormalize=False)  # over one expert: weight 1, every token


def _dense(width_in_experts: int) -> Run:
    h = LMSetup().d_hidden
    moe = {"num_experts": 1, "d_hidden": width_in_experts * h, "balance_coef": 0.0, "z_coef": 0.0}
    return Run(DENSE, losses="course", moe=moe)


RUNS = {
    "top-1": Run(SWITCH, losses="course", moe={"z_coef": 0.0}),
    "top-1 no L_b": Run(SWITCH, losses="course", moe={"z_coef": 0.0, "balance_coef": 0.0}),
    "top-2": Run(MIXTRAL, losses="course", moe={"z_coef": 0.0}),
    "top-2 no L_b": Run(MIXTRAL, losses="course", moe={"z_coef": 0.0, "balance_coef": 0.0}),
    "dense, top-2's FLOPs": _dense(2),
    "dense, all experts' parameters": _dense(LMSetup().num_experts),
}
# the family of comparisons chapter 1 judges (held-out loss, paired by seed)
FAMILY = [
    ("top-1 no L_b", "top-1", "loss"),
    ("top-2 no L_b", "top-2", "loss"),
    ("top-2", "dense, top-2's FLOPs", "loss"),
    ("top-2", "dense, all experts' parameters", "loss"),
    ("top-1", "top-2", "loss"),
]


class Balance(ByteLM):
    name = "balance"
    help = "chapter 1: the balance loss's cost, and dense baselines, on the byte-level LM"
    runs = RUNS


def add_parser(sub) -> None:
    Balance().add_parser(sub)

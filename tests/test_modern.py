"""Chapter 8's comparison: same start for every run, the leak measure, the command's table."""

import csv
import json

import pytest
import torch

from course import modern as md
from course.__main__ import main as cli
from minimoe.experts import Experts
from minimoe.layer import moe_layers
from minimoe.losses import load_balance_loss
from minimoe.routing import sigmoid_top_k

TINY = dict(
    n_layers=1,
    d_model=16,
    d_hidden=16,
    num_experts=4,
    block_size=16,
    batch_size=8,
    steps=4,
    eval_windows=16,
    record_every=2,
    bias_every=2,
)
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


def test_the_command_writes_its_table(tmp_path):
    args = ["modern", *FLAGS, "--seeds", "0", "1", "--runs", "expert choice", "fine-grained"]
    cli([*args, "--timing-repeats", "1", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    names = [md.BASE, "expert choice", "fine-grained"]  # the partner runs too, in RUNS's order
    assert [r["run"] for r in result["summary"]] == names
    for s in result["per_seed"]:
        rows = {r["run"]: r for r in s["rows"]}
        assert rows["expert choice"]["versus"] == md.BASE
        assert rows["expert choice"]["loss_vs"] == pytest.approx(
            rows["expert choice"]["loss"] - rows[md.BASE]["loss"], abs=1e-5
        )
        assert rows["expert choice"]["maxvio_global"] == 0.0  # every expert exactly full
        assert rows["fine-grained"]["experts_per_token"] == 8.0  # k m = 2 x 4
        assert len(s["curves"][md.BASE]["bias"]) == TINY["steps"] // TINY["record_every"]
        assert s["curves"]["expert choice"]["bias"] is None
    with open(tmp_path / "results.csv") as f:
        seeds = [r["seed"] for r in csv.DictReader(f)]
    assert seeds == ["0"] * 3 + ["1"] * 3 + ["mean"] * 3
    for png in ("maxvio.png", "bias.png", "bars.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_every_run_starts_from_the_same_weights():
    setup = md.Setup(**TINY)
    ref = dict(md.build_model(setup, md.BASE).named_parameters())
    for name in md.RUNS:
        model = md.build_model(setup, name)
        for key, p in model.named_parameters():
            if key in ref and ref[key].shape == p.shape:
                assert torch.equal(p, ref[key]), (name, key)
            else:  # drawn fresh: the shared expert and its gate, the fine-grained router and experts
                assert ".shared" in key or name == "fine-grained", (name, key)
        if name != "expert choice":
            assert moe_layers(model)[0].config.capacity_factor is None  # no capacity limit


def test_fine_grained_experts_are_the_coarse_ones_cut_into_pieces(randn):
    m, x = 4, randn(5, 16)
    coarse = Experts(num_experts=2, d_model=16, d_hidden=16)
    fine = Experts(num_experts=2 * m, d_model=16, d_hidden=16 // m)
    with torch.no_grad():
        fine.gate_up[:], fine.down[:] = md.split_experts(coarse.gate_up, coarse.down, m)
    for e in range(2):
        pieces = sum(fine.expert(e * m + j, x) for j in range(m))
        torch.testing.assert_close(pieces, coarse.expert(e, x))


def test_the_aux_loss_is_wang_et_al_s(randn):
    logits = randn(12, 8)
    r = sigmoid_top_k(logits, k=2)
    s = logits.sigmoid()
    f = 8 / (2 * 12) * r.mask.float().sum(0)  # f_i = E / (k T) * tokens choosing i
    P = (s / s.sum(1, keepdim=True)).mean(0)  # mean normalized score
    config = md.RUNS["aux 1e-3"]
    ours = config["balance_coef"] * load_balance_loss(r.probs, r.mask, config["balance_count"])
    torch.testing.assert_close(ours, 1e-3 * (f * P).sum())


def test_the_leak_is_zero_for_top_k_and_positive_for_expert_choice(corpus):
    setup = md.Setup(**TINY)
    batch = md.eval_batches(corpus, setup)[0]
    causal = md.causal_leak(md.build_model(setup, md.BASE), batch)
    assert causal == {"leak_loss": 0.0, "leak_logits": 0.0, "leak_routes": 0.0}
    leak = md.causal_leak(md.build_model(setup, "expert choice"), batch, positions=2)
    assert leak["leak_routes"] > 0 and leak["leak_loss"] > 0 and leak["leak_logits"] > 0

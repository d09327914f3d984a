"""Chapter 6's comparison: same start for every router, fair fine-tuning, the table, the command."""

import csv
import json
import math

import pytest
import torch

from course import compare as cx
from course.__main__ import main as cli
from minimoe.layer import moe_layers
from minimoe.routing import GWBroadcast
from minimoe.train import TrainConfig, train

TINY = dict(
    n_layers=1,
    d_model=16,
    d_hidden=16,
    num_experts=4,
    block_size=8,
    batch_size=4,
    steps=6,
    finetune_steps=2,
    eval_every=3,
    eval_windows=8,
)


@pytest.fixture(scope="module")
def seed_result():
    return cx.run_seed(cx.Setup(**TINY), timing_repeats=1, progress=False)


def test_pareto_front_by_hand():
    # (cost, loss): b dominates d; a is cheapest; c has the lowest loss; e equals b (both kept)
    costs = [0.5, 1.0, 2.0, 1.5, 1.0]
    losses = [3.0, 2.0, 1.0, 2.5, 2.0]
    assert cx.pareto_front(costs, losses) == [True, True, True, False, True]
    assert cx.pareto_front([1.0], [1.0]) == [True]


def test_every_router_starts_from_the_same_weights():
    setup = cx.Setup(**TINY)
    ref = dict(cx.build_model(setup, **cx.ROUTERS["top-2"]).named_parameters())
    for name, moe in cx.ROUTERS.items():
        model = cx.build_model(setup, **moe)
        for key, p in model.named_parameters():
            if key.endswith("gate_extra.weight"):
                assert name == "noisy top-2" and not p.any()  # softplus(0) noise scale to start
            else:
                assert torch.equal(p, ref[key]), (name, key)
        own_capacity = "dropless" in name or name == "expert choice"  # expert choice: its own C
        assert model.config.moe.capacity_factor == (None if own_capacity else 1.25)


def test_a_forked_stream_repeats_the_batches_of_the_one_that_goes_on(corpus):
    stream = cx.BatchStream(corpus, cx.Setup(**TINY))
    stream(None)
    twin = stream.fork()
    for _ in range(3):
        a, b = (
            stream(torch.Generator()),
            twin(torch.Generator().manual_seed(5)),
        )  # trainer's ignored
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_counts_flops_drops_and_experts_by_hand(corpus):
    setup = cx.Setup(**TINY)
    batches = cx.eval_batches(corpus, setup)
    assert len(batches) == 2 and batches[0]["idx"].shape == (4, 8)
    for name, experts in (("top-1", 1.0), ("top-2", 2.0), ("top-2 dropless", 2.0)):
        model = cx.build_model(setup, **cx.ROUTERS[name])
        m = cx.evaluate(model, batches)
        assert m["experts_per_token"] == experts
        per_pair = moe_layers(model)[0].experts.flops_per_assignment()
        kept = experts * (1 - m["dropped_pairs"])  # pairs per token and layer that found a slot
        assert m["flops_per_token"] == pytest.approx(kept * per_pair * setup.n_layers)
        assert 1.0 <= m["load_imbalance"] <= setup.num_experts
        if "dropless" in name:
            assert m["dropped_pairs"] == m["dropped_tokens"] == 0.0
        if name == "top-1":  # one expert per token: a dropped pair is a dropped token
            assert m["dropped_tokens"] == pytest.approx(m["dropped_pairs"])


def test_fine_tuning_starts_from_top2_at_the_right_step_on_its_batches(corpus, seed_result):
    setup = cx.Setup(**TINY)
    batches = cx.eval_batches(corpus, setup)
    top2 = cx.train_router(setup, corpus, "top-2", batches)
    snapshot, stream = top2.record.snapshot
    # the snapshot is top-2 trained for steps - finetune_steps, exactly
    short = cx.build_model(setup, **cx.ROUTERS["top-2"])
    train(
        short,
        cx.BatchStream(corpus, setup),
        TrainConfig(
            steps=setup.steps - setup.finetune_steps, lr=setup.lr, seed=setup.seed, progress=False
        ),
    )
    assert all(torch.equal(a, b) for a, b in zip(snapshot.parameters(), short.parameters()))
    gw = cx.finetune_top2(setup, top2, "top-2 + GW", batches)
    router = gw.model.config.moe.router
    assert isinstance(router, GWBroadcast) and router.threshold == setup.gw_threshold
    assert gw.model.config.moe.z_coef == 0
    assert not any(
        p.requires_grad for p in moe_layers(gw.model)[0].gate.parameters()
    )  # frozen router
    assert gw.curve["steps"][-1] == setup.steps and len(gw.record.steps) == setup.finetune_steps
    assert seed_result["curves"]["top-2 + GW"]["steps"][0] > setup.steps - setup.finetune_steps


def test_broadcasting_every_token_costs_all_experts_in_training_only(corpus):
    setup = cx.Setup(**TINY | {"gw_threshold": 0.0})  # threshold 0: every token is broadcast
    result = cx.run_seed(setup, ["top-2 + GW"], timing_repeats=1, progress=False)
    gw = next(r for r in result["rows"] if r["run"] == "top-2 + GW")
    first = setup.steps - setup.finetune_steps
    expected = (first * 2 + setup.finetune_steps * setup.num_experts) / setup.steps
    assert gw["train_experts_per_token"] == pytest.approx(expected, abs=1e-4)
    assert gw["uncertain_share"] == gw["broadcast_share"] == 1.0  # no slot cap
    assert gw["experts_per_token"] == 2.0  # inference is plain top-2


def test_rows_and_summary(seed_result):
    rows = {r["run"]: r for r in seed_result["rows"]}
    assert list(rows) == ["top-2", *[n for n in cx.ROUTERS if n != "top-2"], *cx.FINETUNED]
    ref = rows["top-2"]
    assert (
        ref["loss_vs_top2"] == 0
        and ref["flops_ratio"] == ref["train_step_ratio"] == ref["inference_ratio"] == 1
    )
    assert rows["top-1"]["experts_per_token"] == 1.0
    assert all(rows[n]["dropped_pairs"] == 0 for n in rows if "dropless" in n)
    for r in rows.values():
        assert r["loss_vs_top2"] == pytest.approx(r["loss"] - ref["loss"], abs=1e-4)
    twice = [
        seed_result,
        {**seed_result, "rows": [r | {"loss": r["loss"] + 0.1} for r in seed_result["rows"]]},
    ]
    summary = {r["run"]: r for r in cx.summarize(twice)}
    assert summary["top-1"]["loss"] == pytest.approx(rows["top-1"]["loss"] + 0.05, abs=1e-4)
    assert summary["top-1"]["loss_std"] == pytest.approx(0.1 / math.sqrt(2), abs=1e-4)
    assert summary["top-1"]["loss_vs_top2_std"] == 0.0  # the same paired difference in both


def test_plot_marks_the_front(seed_result):
    summary = cx.summarize([seed_result])
    ax = cx.plot_pareto(summary, "train_step_ratio")
    assert ax.get_xlabel() == cx.COSTS["train_step_ratio"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("Pareto front") for t in legend)
    named = {t.get_text() for t in ax.texts}  # runs away from top-2's cost are named in place
    far = {r["run"] for r in summary if abs(r["train_step_ratio"] - 1) > 0.05}
    assert named == far
    near = cx.plot_near_top2(summary, "train_step_ratio")
    labels = [t.get_text().split(" (")[0] for t in near.get_yticklabels()]
    assert labels == [r["run"] for r in summary if r["run"] not in far]


def test_command_writes_table_and_plot(tmp_path, capsys):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    cli(
        [
            "compare",
            *flags,
            "--seeds",
            "0",
            "1",
            "--runs",
            "top-2",
            "top-p",
            "--timing-repeats",
            "1",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "results.json").read_text())
    assert [s["setup"]["seed"] for s in result["per_seed"]] == [0, 1]
    assert [r["run"] for r in result["summary"]] == ["top-2", "top-p"]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["seed"] for r in rows] == ["0", "0", "1", "1", "mean", "mean"]
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert "top-p" in capsys.readouterr().out

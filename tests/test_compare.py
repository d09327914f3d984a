"""Chapter 6's comparison on the harness: same start for every router, fair fine-tuning from
top-2's snapshot, dropless evaluation beside the capacity's, the table, the command."""

import json
from dataclasses import replace

import pytest
import torch

from course import compare as cx
from course import harness
from course.__main__ import main as cli
from course.harness import Run
from course.lm import held_out
from minimoe.layer import moe_layers
from minimoe.routing import GWBroadcast

TINY = cx.CompareSetup(
    n_layers=1, d_model=16, block_size=8, batch_size=4, steps=6, finetune_steps=2, eval_windows=8
)


class Tiny(cx.Compare):
    eval_every = 2


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return Tiny(TINY).run_all(out, seeds=[0, 1], progress=False)


def test_pareto_front_by_hand():
    # (cost, loss): b dominates d; a is cheapest; c has the lowest loss; e equals b (both kept)
    costs = [0.5, 1.0, 2.0, 1.5, 1.0]
    losses = [3.0, 2.0, 1.0, 2.5, 2.0]
    assert cx.pareto_front(costs, losses) == [True, True, True, False, True]
    assert cx.pareto_front([1.0], [1.0]) == [True]


def test_every_router_starts_from_the_same_weights():
    exp = cx.Compare(TINY)
    models = {n: exp.model(r.moe_config(exp.base_moe()), 0) for n, r in cx.RUNS.items()}
    ref = dict(models["top-2"].named_parameters())
    for name, model in models.items():
        for key, p in model.named_parameters():
            if key.endswith("gate_extra.weight"):
                assert name == "noisy top-2" and not p.any()  # softplus(0) noise scale to start
            else:
                assert torch.equal(p, ref[key]), (name, key)
        own_capacity = "dropless" in name or name == "expert choice"  # expert choice: its own C
        assert model.config.moe.capacity_factor == (None if own_capacity else 1.25)


def test_evaluation_is_dropless_and_the_capacity_is_measured_beside_it():
    exp = cx.Compare(TINY)
    batches = held_out(TINY)
    assert len(batches) == 2 and batches[0]["idx"].shape == (4, 8)
    for name, experts in (("top-1", 1.0), ("top-2", 2.0), ("top-2 dropless", 2.0)):
        model = exp.model(cx.RUNS[name].moe_config(exp.base_moe()), 0)
        m = cx.evaluate(model, batches)
        assert m["experts_per_token"] == experts
        per_pair = moe_layers(model)[0].experts.flops_per_assignment()
        assert m["flops_per_token"] == pytest.approx(experts * per_pair * TINY.n_layers)
        assert 1.0 <= m["load_imbalance"] <= TINY.num_experts
        with cx.dropless(model):
            free = cx._pass(model.eval(), batches)
        assert m["loss"] == free["loss"], "the headline loss is the dropless one"
        assert model.config.moe.capacity_factor == moe_layers(model)[0].config.capacity_factor
        if "dropless" in name:
            assert m["dropped_pairs"] == m["dropped_tokens"] == 0.0
            assert m["loss_at_capacity"] == m["loss"]
        else:
            assert m["dropped_pairs"] > 0, "an untrained router overfills some expert"
            assert m["loss_at_capacity"] != m["loss"]
        if name == "top-1":  # one expert per token: a dropped pair is a dropped token
            assert m["dropped_tokens"] == pytest.approx(m["dropped_pairs"])


def test_fine_tuning_continues_top2_from_its_snapshot_on_its_batches():
    exp = Tiny(TINY)
    branch = TINY.steps - TINY.finetune_steps
    top2 = exp.run_one("top-2", 0)
    after = exp.run_one("top-2 + plain FT", 0)  # from the snapshot kept while top-2 trained
    fresh = Tiny(TINY).run_one("top-2 + plain FT", 0)  # top-2's first steps trained again
    assert after["measures"] == fresh["measures"] and after["curve"] == fresh["curve"]
    assert after["curve"]["step"] == [branch + 2] and top2["curve"]["step"][-1] == TINY.steps
    # the snapshot is top-2 trained for its first `branch` steps, on its schedule
    short, *_ = Tiny(TINY)._train("top-2", 0, False, branch)
    snapshot = exp._snapshots[("top-2", 0, branch)]
    assert all(torch.equal(snapshot[k], v) for k, v in short.state_dict().items())
    # a fresh optimizer from the same weights on the same batches: one step of fine-tuning
    # without any change of routing reproduces top-2's own next training loss only by chance,
    # so check the batches instead: the continued run draws what top-2 draws from `branch`
    get_batch, _ = exp.data(0)
    g = torch.Generator().manual_seed(0)
    drawn = [get_batch(g) for _ in range(branch + 1)]
    skipping = harness.skipping(get_batch, branch)
    assert torch.equal(skipping(torch.Generator().manual_seed(0))["idx"], drawn[-1]["idx"])


def test_the_gw_run_is_chapter_3s_recipe_on_top2():
    config = cx.RUNS["top-2 + GW"].moe_config(cx.Compare(TINY).base_moe())
    assert isinstance(config.router, GWBroadcast) and config.router.threshold == cx.GW_THRESHOLD
    assert config.z_coef == 0 and config.balance_coef == 1e-2  # top-2's own balance loss
    assert cx.RUNS["top-2 + GW"].train == {"freeze_router": True}
    assert cx.Compare().declared()["top-2 + GW"]["from_step"] == 800  # the last third of 1200


def test_broadcasting_every_token_costs_all_experts_in_training_only(tmp_path):
    class All(Tiny):
        runs = {
            "top-2": cx.RUNS["top-2"],
            "gw all": replace(cx.RUNS["top-2 + GW"], router=GWBroadcast(cx.TOP2, threshold=0.0)),
        }

    results = All(TINY).run_all(tmp_path, seeds=[0], progress=False)
    gw = results.record("gw all", 0)
    assert gw["extra"]["train"]["experts_per_token"] == TINY.num_experts
    assert gw["extra"]["train"]["uncertain"] == gw["extra"]["train"]["broadcast"] == 1.0
    assert gw["measures"]["experts_per_token"] == 2.0  # inference is plain top-2
    branch = TINY.steps - TINY.finetune_steps
    before = results.record("top-2", 0)["extra"]["train_before_branch"]["experts_per_token"]
    own = gw["extra"]["train"]["experts_per_token"]
    cx.RUNS["gw all"] = All.runs["gw all"]  # summary reads the declared runs
    try:
        row = {r["run"]: r for r in cx.summary(results, TINY)}["gw all"]
    finally:
        del cx.RUNS["gw all"]
    expected = (branch * before + TINY.finetune_steps * own) / TINY.steps
    assert row["train_experts_per_token"] == pytest.approx(expected)


def test_summary_rows(tiny_results):
    rows = {r["run"]: r for r in cx.summary(tiny_results, TINY)}
    assert list(rows) == list(cx.RUNS)
    ref = rows["top-2"]
    assert ref["loss_vs_top2"] == 0 and ref["flops_ratio"] == ref["train_flops_ratio"] == 1
    assert rows["top-1"]["experts_per_token"] == 1.0 and rows["top-1"]["flops_ratio"] == 0.5
    assert all(rows[n]["dropped_pairs"] == 0 for n in rows if "dropless" in n)
    for name, r in rows.items():
        diffs = tiny_results.differences(name, "top-2", "loss")
        assert r["loss_vs_top2"] == pytest.approx(sum(diffs) / 2)
        assert r["loss"] == pytest.approx(sum(tiny_results.values(name, "loss")) / 2)
        assert r["step_ratio"] > 0 and r["inference_ratio"] > 0
    gw = rows["top-2 + GW"]
    branch = TINY.steps - TINY.finetune_steps
    assert gw["train_step_ratio"] == pytest.approx(
        (branch + TINY.finetune_steps * gw["step_ratio"]) / TINY.steps
    )


def test_plot_marks_the_front(tiny_results):
    summary = cx.summary(tiny_results, TINY)
    ax = cx.plot_pareto(summary, "flops_ratio")
    assert ax.get_xlabel() == cx.COSTS["flops_ratio"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("Pareto front") for t in legend)
    named = {t.get_text() for t in ax.texts}  # runs away from top-2's cost are named in place
    far = {r["run"] for r in summary if abs(r["flops_ratio"] - 1) > 0.05}
    assert named == far
    near = cx.plot_near_top2(summary, "flops_ratio")
    labels = [t.get_text().split(" (")[0] for t in near.get_yticklabels()]
    assert labels == [r["run"] for r in summary if r["run"] not in far]


def test_the_command_writes_the_harness_format(tmp_path, capsys):
    flags = "--n-layers 1 --d-model 16 --block-size 8 --batch-size 4 --steps 6 --finetune-steps 2"
    cli(["compare", *flags.split(), "--eval-windows", "8", "--seeds", "0", "1"]
        + ["--runs", "top-2", "top-p", "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    results = harness.load(cx.Compare(TINY), tmp_path / "results.json")
    assert results.runs == ["top-2", "top-p"] and results.seeds == [0, 1]
    assert json.loads((tmp_path / "results.json").read_text())["command"].startswith(
        "python -m course compare"
    )
    assert "top-p" in capsys.readouterr().out


def test_a_continuing_run_needs_a_branch_inside_the_run():
    with pytest.raises(ValueError, match="finetune_steps=0 of steps=6"):
        Tiny(replace(TINY, finetune_steps=0)).run_one("top-2 + GW", 0)
    with pytest.raises(ValueError, match="unknown run 'top-3'"):
        Tiny(TINY).run_one("top-3", 0)
    assert Run(cx.TOP2).continues is None


@pytest.mark.gpu
def test_the_experiment_runs_on_cuda_as_on_the_cpu(on_cuda_as_on_cpu):
    """The chapters' live cells run it on the device they pick: every tensor where the model is,
    the held-out measures the CPU's up to rounding (routing near-ties may flip a few tokens)."""
    on_cuda_as_on_cpu(Tiny, TINY, "top-2")


@pytest.mark.gpu
def test_inference_cost_runs_on_cuda():
    from course.gw import inference_cost

    exp = Tiny(replace(TINY, device="cuda"))
    models = {
        n: exp.model(cx.RUNS[n].moe_config(exp.base_moe()), 0).to("cuda")
        for n in ("top-2", "top-1")
    }
    cost = inference_cost(models, held_out(TINY)[0], repeats=1, reference="top-2")
    assert 0 < cost["top-1"]["flops_per_token"] < cost["top-2"]["flops_per_token"]
    assert cost["top-2"]["time_ratio"] == 1.0

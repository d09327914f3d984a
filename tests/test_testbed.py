"""The testbed experiment's measurements (course/testbed.py), against routers built by hand."""

from __future__ import annotations

import pytest
import torch

from course import testbed
from course.harness import Run
from minimoe.routing import TopK


def _oracle(k: int, scale: float = 50.0) -> tuple[testbed.TestbedSetup, object, object]:
    """A model whose router reads the tag: expert c's logit is scale * tag_c."""
    setup = testbed.TestbedSetup(n_train=64, n_test=3000, steps=0)
    exp = testbed.Testbed(setup)
    _, test = setup.tasks()
    model = exp.model(Run(TopK(k=k)).moe_config(exp.base_moe()), seed=0)
    content_dim = test.content.shape[1]
    with torch.no_grad():
        model.moe.gate.weight.zero_()
        model.moe.gate.weight[:, content_dim:] = scale * torch.eye(8)
    return setup, model, test


def test_coverage_of_a_router_that_reads_the_tag():
    _, model, _ = _oracle(k=2)
    r = testbed.measure(model, _oracle(k=2)[2])
    levels = r["levels"]
    assert r["distinct_experts"] == 8, "each function gets its own expert"
    assert levels["1"]["coverage"] == 1 and levels["2"]["coverage"] == 1
    assert levels["3"]["coverage"] == pytest.approx(2 / 3), "top-2 covers two of three functions"
    assert levels["1"]["experts_per_token"] == 2 and levels["1"]["multi_expert_share"] == 1


def test_coverage_of_top_1_and_of_a_router_that_ignores_the_tag():
    _, model, test = _oracle(k=1)
    levels = testbed.measure(model, test)["levels"]
    assert levels["1"]["coverage"] == 1
    assert levels["2"]["coverage"] == pytest.approx(1 / 2)
    assert levels["3"]["coverage"] == pytest.approx(1 / 3)
    with torch.no_grad():
        model.moe.gate.weight.zero_()
    collapsed = testbed.measure(model, test)  # every sample on expert 0 (lowest index on ties)
    assert collapsed["distinct_experts"] == 1, "coverage is read beside distinct_experts:"
    assert collapsed["levels"]["1"]["coverage"] == 1, "one expert 'covers' every level-1 sample"
    assert collapsed["levels"]["2"]["coverage"] == pytest.approx(1 / 2)


def test_flat_measures_weigh_the_levels_by_their_share_of_the_test_set():
    _, model, test = _oracle(k=2)
    measured = testbed.measure(model, test)
    flat = testbed.flat(measured, test)
    share = {m: (test.level == m).float().mean().item() for m in testbed.LEVELS}
    assert sum(share.values()) == pytest.approx(1) and share[1] > share[2] > share[3] > 0
    for key in ("rel_error", "coverage", "experts_per_token"):
        by_level = [measured["levels"][str(m)][key] for m in testbed.LEVELS]
        assert flat[key] == pytest.approx(
            sum(share[m] * v for m, v in zip(testbed.LEVELS, by_level))
        )
        assert [flat[f"{key}@{m}"] for m in testbed.LEVELS] == by_level
    assert flat["distinct_experts"] == 8


def test_the_dirichlet_variant_draws_each_inputs_weights():
    setup = testbed.TestbedSetup(n_train=64, n_test=3000, mixing="dirichlet")
    _, test = setup.tasks()
    assert torch.allclose(test.weights.sum(1), torch.ones(len(test)))
    two = test.weights[test.level == 2]
    top = two.max(1).values
    assert top.min() > 0.5 - 1e-6 and 0.70 < top.mean() < 0.80, "U(1/2, 1): mean 3/4"
    assert testbed.TestbedDirichlet().setup.mixing == "dirichlet"


def test_every_declared_run_and_the_sweep():
    exp = testbed.Testbed()
    assert {"top-1", "top-2", "top-2 raw", "adaptive 0.1"} <= set(exp.runs)
    assert [exp.runs[f"top-p {p}"].router for p in testbed.SWEEP_PS] == [
        testbed.TopP(p=p) for p in testbed.SWEEP_PS
    ]
    configs = exp.declared()
    assert all(c["moe"]["capacity_factor"] is None for c in configs.values()), "dropless"
    assert all(c["moe"]["z_coef"] == 0 for c in configs.values()), "each paper's own losses"


def test_command_writes_results_and_refuses_a_bad_run_first(tmp_path):
    import json

    from course.__main__ import main

    tiny = ["--steps", "2", "--n-train", "128", "--n-test", "256", "--batch-size", "16"]
    out = tmp_path / "tb"
    main(["testbed", *tiny, "--seeds", "0", "--runs", "top-2", "top-p 0.3", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in saved["results"]] == ["top-2", "top-p 0.3"]
    assert saved["setup"]["steps"] == 2 and (out / "results.csv").exists()
    with pytest.raises(ValueError, match="'top-9'"):
        main(["testbed", *tiny, "--runs", "top-2", "top-9", "--out", str(tmp_path / "no")])
    assert not (tmp_path / "no").exists(), "nothing trained or written before the check"
    main(["testbed_dirichlet", *tiny, "--seeds", "0", "--runs", "top-1", "--out", str(out / "d")])
    assert json.loads((out / "d" / "results.json").read_text())["setup"]["mixing"] == "dirichlet"


@pytest.mark.gpu
def test_the_experiment_runs_on_cuda_as_on_the_cpu(on_cuda_as_on_cpu):
    """The chapters' live cells run it on the device they pick: every tensor where the model is,
    the held-out measures the CPU's up to rounding (routing near-ties may flip a few tokens)."""
    setup = testbed.TestbedSetup(n_train=256, n_test=3000, steps=20, batch_size=32)
    on_cuda_as_on_cpu(testbed.Testbed, setup, "top-2", "rel_error")

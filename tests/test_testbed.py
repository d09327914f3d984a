"""The testbed experiment's measurements (course/testbed.py), against routers built by hand."""

from __future__ import annotations

import pytest
import torch

from course import testbed
from minimoe.routing import TopK


def _oracle(k: int, scale: float = 50.0) -> tuple[testbed.TestbedSetup, object, object]:
    """A model whose router reads the tag: expert c's logit is scale * tag_c."""
    setup = testbed.TestbedSetup(n_train=64, n_test=3000, steps=0)
    _, test = setup.tasks()
    model = setup.model(TopK(k=k), test)
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


def test_a_short_run_and_the_paired_differences(tmp_path):
    setup = testbed.TestbedSetup(n_train=256, n_test=512, steps=3, batch_size=32)
    runs = [testbed.run(name, setup) for name in ("top-1", "top-2")]
    runs.append(testbed.run("top-1", testbed.replace(setup, seed=1)))
    results = {"setup": {}, "runs": runs}
    rows = testbed.table(results)
    assert len(rows) == 3 * len(testbed.LEVELS) and {r["level"] for r in rows} == {1, 2, 3}
    diff = testbed.paired(results, "top-1", "top-2")  # seed 0 only: top-2 has no seed 1
    for m in testbed.LEVELS:
        a, b = runs[0]["levels"][str(m)], runs[1]["levels"][str(m)]
        assert diff[m] == [a["rel_error"] - b["rel_error"]]
    assert runs[0]["levels"]["1"]["experts_per_token"] == 1
    with pytest.raises(ValueError, match="'top-p 0.4'"):
        testbed.paired(results, "top-1", "top-p 0.4")


def test_router_names_of_the_sweep():
    assert testbed.router_named("top-2") == testbed.ROUTERS["top-2"]
    assert testbed.router_named("top-p 0.2") == testbed.TopP(p=0.2)
    with pytest.raises(ValueError, match="'top-p x'"):
        testbed.router_named("top-p x")
    with pytest.raises(ValueError, match="'top-3'"):
        testbed.router_named("top-3")


def test_command_writes_results_and_refuses_a_bad_router_first(tmp_path):
    import json

    from course.__main__ import main

    tiny = ["--steps", "2", "--n-train", "128", "--n-test", "256", "--batch-size", "16"]
    out = tmp_path / "tb"
    main(["testbed", *tiny, "--seeds", "0", "--routers", "top-2", "top-p 0.3", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert [r["router"] for r in saved["runs"]] == ["top-2", "top-p 0.3"]
    assert saved["setup"]["steps"] == 2 and (out / "results.csv").exists()
    with pytest.raises(ValueError, match="'top-9'"):
        main(["testbed", *tiny, "--routers", "top-2", "top-9", "--out", str(tmp_path / "no")])
    assert not (tmp_path / "no").exists(), "nothing trained or written before the check"


def test_overall_weights_the_levels_by_their_share_of_the_test_set():
    results = testbed.load_results()
    share = testbed.level_shares(results)
    assert sum(share.values()) == pytest.approx(1) and share[1] > share[2] > share[3] > 0
    seeds = testbed.per_seed(results, "top-2", "rel_error", 1)
    assert len(seeds) == 3
    by_hand = [
        sum(share[m] * testbed.per_seed(results, "top-2", "rel_error", m)[s] for m in (1, 2, 3))
        for s in range(3)
    ]
    assert testbed.overall(results, "top-2", "rel_error") == pytest.approx(by_hand)
    assert testbed.overall(results, "top-1", "experts_per_token") == pytest.approx([1, 1, 1])

"""The experiment harness (course/harness.py): declared runs, one results format, the checks."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from course import (
    adaptive,
    balance,
    balance_scope,
    compare,
    gw,
    harness,
    modern,
    ondemand,
    testbed,
    text,
    topp,
)
from course.harness import Run
from minimoe.layer import MoEConfig
from minimoe.routing import TopK, TopP

TINY = testbed.TestbedSetup(n_train=128, n_test=512, steps=4, batch_size=16)


class Tiny(testbed.Testbed):
    name = "tiny"
    runs = {"top-1": Run(TopK(k=1, renormalize=False)), "top-2": Run(TopK(k=2))}
    eval_every = 2


def test_run_applies_the_loss_recipe_then_the_changes():
    base = MoEConfig()
    paper = Run(TopP(p=0.4)).moe_config(base)
    assert paper.z_coef == 0 and paper.dynamic_beta == 1e-4, "the Top-P paper's own losses"
    course = Run(TopP(p=0.4), losses="course", moe={"balance_coef": 0.0}).moe_config(base)
    assert course.z_coef == base.z_coef and course.balance_coef == 0.0
    with pytest.raises(ValueError, match="losses='papers'"):
        Run(TopK(), losses="papers")


def test_results_format_and_the_checks_on_load(tmp_path):
    exp = Tiny(TINY)
    results = exp.run_all(tmp_path, seeds=[0, 1], progress=False, command="python -m course tiny")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["format"] == harness.FORMAT and saved["experiment"] == "tiny"
    router = saved["runs"]["top-2"]["moe"]["router"]
    assert router["name"] == "top_k" and router["k"] == 2, "the router as data, not as a flag"
    assert saved["seeds"] == [0, 1] and len(saved["results"]) == 4
    assert set(saved["versions"]) == {"minimoe", "torch", "python"}
    one = results.record("top-2", 1)
    assert one["curve"]["step"] == [2, 4] and len(one["curve"]["rel_error"]) == 2
    assert one["measures"]["rel_error"] == one["curve"]["rel_error"][-1], "final = last eval"
    assert (tmp_path / "results.csv").read_text().count("\n") == 5  # header + 4 runs

    loaded = harness.load(exp, tmp_path / "results.json")
    assert loaded.values("top-1", "experts_per_token") == [1.0, 1.0]
    c = loaded.compare("top-1", "top-2", "rel_error")
    assert c.diffs == pytest.approx(
        [
            loaded.values("top-1", "rel_error")[s] - loaded.values("top-2", "rel_error")[s]
            for s in (0, 1)
        ]
    )
    assert c.drift is not None
    assert loaded.differences("top-1", "top-2", "rel_error") == list(c.diffs)

    changed = Tiny(TINY)
    changed.runs = {"top-2": Run(TopK(k=2), losses="course")}  # same name, other recipe
    with pytest.raises(ValueError, match="run 'top-2' was made with"):
        harness.load(changed, tmp_path / "results.json")
    with pytest.raises(ValueError, match="not testbed's results"):
        harness.load(testbed.Testbed(), tmp_path / "results.json")


def test_a_field_added_since_with_its_old_default_keeps_a_cache_valid(tmp_path):
    exp = Tiny(TINY)
    exp.run_all(tmp_path, names=["top-2"], seeds=[0], progress=False)
    path = tmp_path / "results.json"
    data = harness.json.loads(path.read_text())
    # as if written before MoEConfig had seq_balance_coef and TopK had balance_count
    del data["runs"]["top-2"]["moe"]["seq_balance_coef"]
    del data["runs"]["top-2"]["moe"]["router"]["balance_count"]
    path.write_text(harness.json.dumps(data))
    assert harness.load(exp, path).runs == ["top-2"]
    data["runs"]["top-2"]["moe"]["router"]["k"] = 1  # another value: refused
    path.write_text(harness.json.dumps(data))
    with pytest.raises(ValueError, match="run 'top-2' was made with"):
        harness.load(exp, path)
    data["runs"]["top-2"]["moe"]["router"] |= {"k": 2, "no_such_field": 1}  # unreadable: refused
    path.write_text(harness.json.dumps(data))
    with pytest.raises(ValueError, match="run 'top-2' was made with"):
        harness.load(exp, path)


def test_reruns_replace_their_seed_and_keep_the_rest(tmp_path):
    exp = Tiny(TINY)
    exp.run_all(tmp_path, names=["top-2"], seeds=[0, 1], progress=False)
    first = harness.load(exp, tmp_path / "results.json").values("top-2", "rel_error")
    exp.run_all(tmp_path, names=["top-2", "top-1"], seeds=[1], progress=False)
    again = harness.load(exp, tmp_path / "results.json")
    assert again.values("top-2", "rel_error") == first, "same seed, same numbers"
    assert again.seeds_of("top-1", "top-2") == [1] and again.seeds_of("top-2") == [0, 1]


def test_bad_requests_are_refused_before_training(tmp_path):
    exp = Tiny(TINY)
    with pytest.raises(ValueError, match="unknown run 'top-9'"):
        exp.run_all(tmp_path, names=["top-9"], progress=False)
    with pytest.raises(ValueError, match=r"distinct, got \[0, 0\]"):
        exp.run_all(tmp_path, seeds=[0, 0], progress=False)
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(FileNotFoundError, match="python -m course tiny"):
        harness.load(exp, tmp_path / "nothing.json")


def test_a_failed_write_leaves_the_saved_file_whole(tmp_path, monkeypatch):
    exp = Tiny(replace(TINY, steps=2))
    exp.run_all(tmp_path, names=["top-2"], seeds=[0], progress=False)
    before = (tmp_path / "results.json").read_text()
    monkeypatch.setattr(harness.json, "dump", _raise)
    with pytest.raises(OSError):
        exp.run_all(tmp_path, names=["top-1"], seeds=[0], progress=False)
    assert (tmp_path / "results.json").read_text() == before
    assert not list(tmp_path.glob("*.tmp")), "no stray temporary file"


def _raise(*args, **kwargs):
    raise OSError("disk full")


def test_family_is_holm_corrected(tmp_path):
    exp = Tiny(TINY)
    results = exp.run_all(tmp_path, seeds=[0, 1, 2], progress=False)
    pairs = [("top-1", "top-2", "rel_error"), ("top-1", "top-2", "coverage")]
    fam = results.family(pairs)
    plain = [results.compare(*p) for p in pairs]
    for corrected, raw in zip(fam, plain):
        assert corrected.mean == raw.mean and corrected.p_holm >= raw.p
        assert corrected.high - corrected.low >= raw.high - raw.low - 1e-12


def test_a_rerun_is_held_to_the_seeds_range_or_the_last_digits():
    def record(seed, losses):
        return {"run": "a", "seed": seed, "curve": {"step": [10, 20], "loss": losses}}

    results = harness.Results(
        {
            "seeds": [0, 1, 2],
            "results": [record(0, [1.0, 0.5]), record(1, [1.2, 0.5]), record(2, [0.9, 0.5])],
        }
    )
    assert results.rerun_tolerance("a", "loss", 10) == pytest.approx(0.3)  # 1.2 - 0.9
    assert results.rerun_tolerance("a", "loss", 20) == harness.EXACT  # every seed alike
    with pytest.raises(KeyError):
        results.rerun_tolerance("b", "loss", 10)


def test_merge_joins_processes_run_side_by_side(tmp_path):
    exp = Tiny(TINY)
    exp.run_all(tmp_path / "a", seeds=[0], progress=False)
    exp.run_all(tmp_path / "b", seeds=[1], progress=False)
    joined = harness.merge(
        exp, [tmp_path / "a" / "results.json", tmp_path / "b" / "results.json"], tmp_path / "all"
    )
    assert joined.seeds == [0, 1] and harness.load(exp, tmp_path / "all" / "results.json").seeds_of(
        "top-1"
    ) == [0, 1]
    with pytest.raises(ValueError, match="seed 0 is in two parts"):
        harness.merge(
            exp,
            [tmp_path / "a" / "results.json", tmp_path / "all" / "results.json"],
            tmp_path / "x",
        )


HARNESS_EXPERIMENTS = [
    gw.GWExperiment,
    testbed.Testbed,
    testbed.TestbedDirichlet,
    topp.TokenTasks,
    balance.Balance,
    text.Text,
    compare.Compare,
    modern.Modern,
    ondemand.OnDemand,
    ondemand.OnDemandText,
    adaptive.AdaptiveGating,
    balance_scope.BalanceScope,
]


@pytest.mark.parametrize("cls", HARNESS_EXPERIMENTS, ids=lambda c: c.name)
def test_every_cached_result_matches_its_declared_runs(cls):
    exp = cls()
    results = harness.load(exp)  # refuses a stored config that differs from the declared one
    assert set(results.runs) == set(exp.runs), "every declared run is cached, and nothing else"
    assert results.seeds == list(exp.seeds)
    for run in exp.runs:
        assert results.seeds_of(run) == list(exp.seeds), f"{run}: every seed"
        for seed in exp.seeds:
            record = results.record(run, seed)
            assert record["curve"]["step"][-1] == exp.last_step(run), (
                "trained to the declared steps"
            )
            assert record["measures"] == {
                k: v[-1] for k, v in record["curve"].items() if k != "step"
            }
    assert results.data["setup"] == harness.json.loads(harness.json.dumps(exp.header("")["setup"]))


def test_results_are_written_readable_like_any_file(tmp_path):
    Tiny(replace(TINY, steps=2)).run_all(tmp_path, names=["top-2"], seeds=[0], progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_first_steps_of_a_run_are_its_cached_curves_prefix(tmp_path):
    exp = Tiny(replace(TINY, steps=8, lr_schedule="cosine"))
    full = exp.run_all(tmp_path, names=["top-2"], seeds=[0], progress=False).record("top-2", 0)
    first = exp.run_one("top-2", 0, steps=4)  # the first half, on the 8-step schedule
    assert first["curve"]["step"] == [2, 4]
    assert first["curve"]["rel_error"] == full["curve"]["rel_error"][:2]
    short = Tiny(replace(TINY, steps=4, lr_schedule="cosine")).run_one("top-2", 0)
    assert short["curve"]["rel_error"][-1] != full["curve"]["rel_error"][1], "another schedule"

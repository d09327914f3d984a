"""The text experiment behind chapters 4 and 5 (course/text.py): difficulty fifths, top-2's
fifths for every router of a seed, the command."""

import pytest
import torch

from course import harness, text
from course.lm import LMSetup

TINY = LMSetup(n_layers=1, d_model=16, block_size=8, batch_size=4, steps=4, eval_windows=16)


class Tiny(text.Text):
    eval_every = 2


def test_quintiles_by_hand():
    loss = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1, 4.0, 2.5, 0.7, 1.5, 3.5])
    # sorted: 0.1 0.5 | 0.7 1.0 | 1.5 2.0 | 2.5 3.0 | 3.5 4.0, two positions per fifth
    assert text.quintiles(loss).tolist() == [0, 3, 1, 2, 0, 4, 3, 1, 2, 4]
    sizes = torch.bincount(text.quintiles(torch.randn(1003)))
    assert len(sizes) == 5 and sizes.sum() == 1003 and sizes.max() - sizes.min() <= 1


def test_every_router_with_its_papers_losses_on_top2s_fifths(tmp_path):
    results = Tiny(TINY).run_all(tmp_path, seeds=[0, 1], progress=False)
    assert results.runs == list(text.RUNS) and results.seeds == [0, 1]
    for name, run in text.RUNS.items():
        config = run.moe_config(Tiny(TINY).base_moe())
        assert config.z_coef == 0 and config.capacity_factor is None, "paper's losses, dropless"
        for q in text.per_seed(results, name, "by_quintile"):
            assert len(q) == text.QUINTILES
            if name.startswith("top-2"):
                assert q == [2.0] * text.QUINTILES
    # the fifths are top-2's: under top-2 the loss rises from the easiest fifth to the hardest
    assert all(sorted(q) == q for q in text.per_seed(results, "top-2", "loss_by_quintile"))
    # a router run alone gets the same fifths: top-2 is trained again for them
    alone = Tiny(TINY).run_one("top-p 0.4", 1)
    assert alone["extra"] == results.record("top-p 0.4", 1)["extra"]
    assert alone["run"] == "top-p 0.4" and alone["seed"] == 1


def test_the_command_writes_the_harness_format(tmp_path):
    from course.__main__ import main

    args = "text --steps 4 --eval-windows 16 --d-model 16 --block-size 8 --seeds 0 --runs top-2"
    main([*args.split(), "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    loaded = harness.load(text.Text(LMSetup(steps=4, eval_windows=16, d_model=16, block_size=8)),
                          tmp_path / "results.json")  # fmt: skip
    assert loaded.runs == ["top-2"]


def test_a_bad_run_name_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown run 'top-3'"):
        Tiny(TINY).run_all(tmp_path, names=["top-3"], progress=False)


@pytest.mark.gpu
def test_the_experiment_runs_on_cuda_as_on_the_cpu(on_cuda_as_on_cpu):
    """The chapters' live cells run it on the device they pick: every tensor where the model is,
    the held-out measures the CPU's up to rounding (routing near-ties may flip a few tokens)."""
    on_cuda_as_on_cpu(Tiny, TINY, "top-p 0.4")

"""The text experiment behind chapters 4 and 5 (course/text.py): difficulty quintiles and a tiny run."""

import json

import pytest
import torch

from course import text


def test_quintiles_by_hand():
    loss = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1, 4.0, 2.5, 0.7, 1.5, 3.5])
    # sorted: 0.1 0.5 | 0.7 1.0 | 1.5 2.0 | 2.5 3.0 | 3.5 4.0, two positions per fifth
    assert text.quintiles(loss).tolist() == [0, 3, 1, 2, 0, 4, 3, 1, 2, 4]
    sizes = torch.bincount(text.quintiles(torch.randn(1003)))
    assert len(sizes) == 5 and sizes.sum() == 1003 and sizes.max() - sizes.min() <= 1


def test_command_runs_every_router_with_its_papers_losses_on_the_reference_quintiles(tmp_path):
    from course.__main__ import main

    args = "text --steps 4 --track-every 2 --eval-windows 16 --d-model 16 --d-hidden 16 --seeds 0 1"
    results = main([*args.split(), "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("router,seed,val_loss") and len(rows) == 1 + 2 * len(text.ROUTERS)
    runs = results["runs"]
    assert [(r["router"], r["seed"]) for r in runs] == [
        (name, seed) for seed in (0, 1) for name in text.ROUTERS
    ]
    for r in runs:
        assert len(r["by_quintile"]) == text.QUINTILES and r["trajectory"]["steps"] == [0, 2, 4]
        if r["router"].startswith("top-2"):
            assert r["by_quintile"] == [2.0] * text.QUINTILES
    # the quintiles are top-2's: under top-2 the loss rises from the easiest fifth to the hardest
    top2 = text.per_seed(results, "top-2", "loss_by_quintile")
    assert all(sorted(q) == q for q in top2)
    assert text.per_seed(results, "top-p 0.4", "seed") == [0, 1]


def test_a_bad_router_name_is_refused_before_training(tmp_path):
    from course.__main__ import main

    with pytest.raises(SystemExit):
        main(["text", "--routers", "top-3", "--out", str(tmp_path)])

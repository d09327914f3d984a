"""Chapter 8's comparison on the harness: same start for every run, fine-grained experts cut
from the coarse ones, Wang et al.'s loss, the leak measure, the command."""

import pytest
import torch

from course import harness
from course import modern as md
from course.__main__ import main as cli
from course.lm import LMSetup, held_out
from minimoe.experts import Experts
from minimoe.layer import moe_layers
from minimoe.losses import load_balance_loss
from minimoe.routing import sigmoid_top_k

# the runs' widths are the chapter's (8 experts of 128); the rest is tiny
TINY = LMSetup(n_layers=1, d_model=16, block_size=16, batch_size=8, steps=40, eval_windows=16)


def model(name: str, setup: LMSetup = TINY):
    exp = md.Modern(setup)
    return exp.model(md.RUNS[name].moe_config(exp.base_moe()), setup.seed)


def test_the_command_writes_its_results(tmp_path):
    runs = [md.BASE, "expert choice", "fine-grained"]
    flags = "--n-layers 1 --d-model 16 --block-size 16 --batch-size 8 --steps 40 --eval-windows 16"
    cli(["modern", *flags.split(), "--seeds", "0", "1", "--runs", *runs]
        + ["--threads", "1", "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    results = harness.load(md.Modern(TINY), tmp_path / "results.json")
    rows = {r["run"]: r for r in md.summary(results)}
    assert list(rows) == runs
    assert rows["expert choice"]["versus"] == md.BASE
    assert rows["expert choice"]["loss_vs"] == pytest.approx(
        rows["expert choice"]["loss"] - rows[md.BASE]["loss"]
    )
    assert results.values("expert choice", "maxvio_global") == [0.0, 0.0]  # exactly full
    assert rows["fine-grained"]["experts_per_token"] == 8.0  # k m = 2 x 4
    for s in (0, 1):
        assert len(md.curves(results, md.BASE, s)["bias"]) == TINY.steps // md.BIAS_EVERY
        assert md.curves(results, "expert choice", s)["bias"] is None
        assert sum(md.curves(results, md.BASE, s)["expert_counts"]) == pytest.approx(1.0)


def test_every_run_starts_from_the_same_weights():
    ref = dict(model(md.BASE).named_parameters())
    coarse = moe_layers(model(md.BASE))[0].experts
    for name in md.RUNS:
        m = model(name)
        for key, p in m.named_parameters():
            if key in ref and ref[key].shape == p.shape:
                assert torch.equal(p, ref[key]), (name, key)
            else:  # drawn fresh: the shared expert and its gate, the fine-grained router
                assert ".shared" in key or "fine-grained" in name, (name, key)
        assert moe_layers(m)[0].config.capacity_factor is None  # no capacity limit
        if "fine-grained" in name:  # its experts are the coarse ones cut into pieces
            fine = moe_layers(m)[0].experts
            x = torch.randn(3, TINY.d_model, generator=torch.Generator().manual_seed(0))
            pieces = sum(fine.expert(j, x) for j in range(md.M))
            torch.testing.assert_close(pieces, coarse.expert(0, x))


def test_fine_grained_experts_are_the_coarse_ones_cut_into_pieces(randn):
    m, x = 4, randn(5, 16)
    coarse = Experts(num_experts=2, d_model=16, d_hidden=16)
    fine = Experts(num_experts=2 * m, d_model=16, d_hidden=16 // m)
    with torch.no_grad():
        fine.gate_up[:], fine.down[:] = md.split_experts(coarse.gate_up, coarse.down, m)
    for e in range(2):
        pieces = sum(fine.expert(e * m + j, x) for j in range(m))
        torch.testing.assert_close(pieces, coarse.expert(e, x))


def test_the_fine_grained_runs_differ_in_the_routed_scaling_only():
    scaled, plain = (md.RUNS[n].moe_config(md.Modern().base_moe()) for n in md.RUNS if "fine" in n)
    assert (scaled.num_experts, scaled.d_hidden, scaled.router.k) == (32, 32, 8)
    assert scaled.router.scaling == md.M and plain.router.scaling == 1.0
    a, b = (moe_layers(model(n))[0] for n in ("fine-grained", "fine-grained unscaled"))
    h = torch.randn(10, TINY.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # same weights: the scaled routed output is M times the other
        torch.testing.assert_close(a(h).output, md.M * b(h).output)


def test_the_aux_loss_is_wang_et_al_s(randn):
    logits = randn(12, 8)
    r = sigmoid_top_k(logits, k=2)
    s = logits.sigmoid()
    f = 8 / (2 * 12) * r.mask.float().sum(0)  # f_i = E / (k T) * tokens choosing i
    P = (s / s.sum(1, keepdim=True)).mean(0)  # mean normalized score
    config = md.RUNS["aux 1e-3"].moe
    ours = config["balance_coef"] * load_balance_loss(r.probs, r.mask, config["balance_count"])
    torch.testing.assert_close(ours, 1e-3 * (f * P).sum())


def test_the_leak_is_zero_for_top_k_and_positive_for_expert_choice():
    batch = held_out(TINY)[0]
    causal = md.causal_leak(model(md.BASE), batch)
    assert causal == {"leak_loss": 0.0, "leak_logits": 0.0, "leak_routes": 0.0}
    leak = md.causal_leak(model("expert choice"), batch, positions=2)
    assert leak["leak_routes"] > 0 and leak["leak_loss"] > 0 and leak["leak_logits"] > 0


def test_the_hash_run_routes_each_byte_by_its_row_of_a_fixed_table():
    m = model("hash")
    idx = torch.randint(0, 256, (4, TINY.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(idx=idx)
    for layer, moe in zip(out.layers, moe_layers(m)):
        table = moe.router_state.table  # (256, 2)
        expected = torch.zeros_like(layer.routing.mask).scatter(1, table[idx.flatten()], True)
        assert torch.equal(layer.routing.mask, expected)
        assert torch.equal(table, moe_layers(model("hash", TINY))[0].router_state.table)  # fixed
    config = md.RUNS["hash"].moe_config(md.Modern().base_moe())
    assert config.balance_coef == 0 and config.z_coef == 0  # no balancing
    assert md.versus("hash") == md.BASE


def test_the_table_of_recent_routers_is_rows_of_the_family_table():
    from minimoe.families import FAMILIES
    from minimoe.zoo_table import describe

    names = {f.name: f for f in FAMILIES}
    rows = md.recent_routers()
    assert [r["family"] for r in rows] == list(md.RECENT)
    for row in rows:
        assert row["family"] in names, f"{row['family']} is no longer in minimoe.families"
        full = describe(names[row["family"]])
        assert {c: full[c] for c in md.RECENT_COLUMNS} == {c: row[c] for c in md.RECENT_COLUMNS}
        assert row["reference"] == md.RECENT[row["family"]]
    table = md.markdown_table(rows).splitlines()
    assert len(table) == len(rows) + 2 and table[0].count("|") == len(rows[0]) + 1


@pytest.mark.gpu
def test_the_experiment_runs_on_cuda_as_on_the_cpu(on_cuda_as_on_cpu):
    """The chapters' live cells run it on the device they pick: every tensor where the model is,
    the held-out measures the CPU's up to rounding (routing near-ties may flip a few tokens)."""
    gpu = on_cuda_as_on_cpu(md.Modern, TINY, md.BASE)

    assert gpu["extra"]["leak_loss"] < 1e-5, "causal on the GPU too, to rounding"

"""Chapter 8's balance-scope experiment: each scope is the library's loss over the right tokens,
batches of domains, the specialization measure by hand, the same start for every run."""

from dataclasses import replace

import pytest
import torch

from course import balance_scope as bs
from course import harness
from course.__main__ import main as cli
from minimoe.losses import accumulated_balance_loss, load_balance_loss
from minimoe.routing import Routing

TINY = bs.ScopeSetup(n_train=512, n_test=512, batch_size=64, steps=6, seq_len=8, micro_batch=2)


def routings(randn, layers=2, tokens=64, experts=8, k=2):
    out = []
    for layer in range(layers):
        logits = randn(tokens, experts, seed=layer)
        probs = logits.softmax(dim=1)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(1, probs.topk(k, 1).indices, True)
        out.append(Routing(logits=logits, probs=probs, mask=mask, weights=probs * mask))
    return out


@pytest.mark.parametrize(
    "scope, tokens_per_group",
    [(bs.Scope(), 64), (bs.Scope(over="micro-batch"), 16), (bs.Scope(over="sequence"), 8)],
)
def test_each_scope_is_the_library_loss_per_layer_over_its_groups(randn, scope, tokens_per_group):
    rs = routings(randn)
    got = scope.loss(rs, seq_len=8, micro_batch=2, k=2)
    per_layer = [load_balance_loss(r.probs, r.mask, "selected", tokens_per_group) for r in rs]
    torch.testing.assert_close(got, 1e-2 * torch.stack(per_layer).mean() / 2)
    not_per_k = replace(scope, per_k=False).loss(rs, seq_len=8, micro_batch=2, k=2)
    torch.testing.assert_close(not_per_k, 2 * got)  # HF's: k at balance


def test_accumulated_and_pooled_scopes(randn):
    rs = routings(randn)
    acc = bs.Scope(over="accumulated").loss(rs, seq_len=8, micro_batch=2, k=2)
    per_layer = [accumulated_balance_loss(r.probs, r.mask, "selected", 16) for r in rs]
    torch.testing.assert_close(acc, 1e-2 * torch.stack(per_layer).mean() / 2)
    pooled = bs.Scope(layers="pooled").loss(rs, seq_len=8, micro_batch=2, k=2)
    every = [torch.cat([r.probs for r in rs]), torch.cat([r.mask for r in rs])]
    torch.testing.assert_close(pooled, 1e-2 * load_balance_loss(*every, "selected") / 2)
    # pooled per sequence: each sequence's tokens of both layers in one product
    seq = bs.Scope(over="sequence", layers="pooled").loss(rs, seq_len=8, micro_batch=2, k=2)
    by_hand = [
        load_balance_loss(
            torch.cat([r.probs[s : s + 8] for r in rs]), torch.cat([r.mask[s : s + 8] for r in rs]),
            "selected",
        )
        for s in range(0, 64, 8)
    ]  # fmt: skip
    torch.testing.assert_close(seq, 1e-2 * torch.stack(by_hand).mean() / 2)


def test_pooling_over_layers_hides_layers_that_collapse_apart():
    # layer l sends every token to expert l (k = 1): each layer alone is at its worst, E
    E = 4
    rs = []
    for layer in range(E):
        probs = torch.nn.functional.one_hot(torch.full((8,), layer), E).float()
        rs.append(Routing(logits=probs, probs=probs, mask=probs.bool(), weights=probs))
    each = bs.Scope(alpha=1.0).loss(rs, seq_len=8, micro_batch=1, k=1)
    pooled = bs.Scope(layers="pooled", alpha=1.0).loss(rs, seq_len=8, micro_batch=1, k=1)
    assert each.item() == pytest.approx(E) and pooled.item() == pytest.approx(1.0)


def test_scopes_are_checked():
    with pytest.raises(ValueError, match="over must be one of"):
        bs.Scope(over="token")
    with pytest.raises(ValueError, match="layers must be one of"):
        bs.Scope(layers="sum")


def test_every_sequence_is_one_domain():
    exp = bs.BalanceScope(TINY)
    get, test = exp.data(0)
    task = TINY.train_set(0)
    batch = get(torch.Generator().manual_seed(0))
    assert batch["x"].shape == (8, 8, task.x.shape[1]) and batch["y"].shape[:2] == (8, 8)
    rows = {tuple(r.tolist()): i for i, r in enumerate(task.x)}
    for sequence in batch["x"]:  # the functions every input of the sequence uses
        shared = task.member[[rows[tuple(x.tolist())] for x in sequence]].all(dim=0)
        assert shared.any(), "one function common to the whole sequence"


def test_specialization_by_hand():
    test = TINY.test_set()
    one = test.level == 1
    funcs = test.member.float().argmax(1)  # the function of each level-1 input
    E = 8

    def routed(first):  # a Routing whose first choice is `first` (N,)
        probs = torch.nn.functional.one_hot(first, E).float() * 0.9 + 0.1 / E
        return Routing(logits=probs.log(), probs=probs, mask=probs > 0.5, weights=probs)

    assert bs.specialization(routed(funcs), test) == pytest.approx(1.0)  # expert c serves c
    everyone = torch.zeros(len(test.level), dtype=torch.long)  # one expert for all
    shares = test.member[one].float().mean(0)
    assert bs.specialization(routed(everyone), test) == pytest.approx(shares.max().item())
    counts = bs.first_choices(routed(funcs), test)
    assert counts.sum().item() == one.sum().item() and torch.equal(counts, counts.diag().diag())


def test_every_run_starts_from_the_same_weights():
    exp = bs.BalanceScope(TINY)
    ref = exp.build(bs.RUNS[bs.REFERENCE], 0).state_dict()
    for name, run in bs.RUNS.items():
        model = exp.build(run, 0)
        assert model.scope == run.scope and len(model.layers) == TINY.n_layers
        for key, value in model.state_dict().items():
            assert torch.equal(value, ref[key]), (name, key)


def test_the_command_writes_its_results_and_the_scope_is_part_of_the_run(tmp_path):
    flags = "--n-train 512 --n-test 512 --batch-size 64 --steps 6 --seq-len 8 --micro-batch 2"
    runs = [bs.REFERENCE, "sequence"]
    cli(["balance_scope", *flags.split(), "--seeds", "0", "1", "--runs", *runs]
        + ["--threads", "1", "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    exp = bs.BalanceScope(TINY)
    results = harness.load(exp, tmp_path / "results.json")
    assert results.runs == runs and results.seeds == [0, 1]
    assert results.data["runs"]["sequence"]["scope"]["over"] == "sequence"
    record = results.record("sequence", 1)
    assert 0 < record["measures"]["specialization"] <= 1
    assert len(record["extra"]["first_choices"]) == TINY.n_layers
    changed = dict(exp.runs) | {"sequence": replace(exp.runs["sequence"], scope=bs.Scope())}
    exp.runs = changed
    with pytest.raises(ValueError, match="run 'sequence' was made with"):
        harness.load(exp, tmp_path / "results.json")


@pytest.mark.gpu
def test_the_experiment_runs_on_cuda_as_on_the_cpu(on_cuda_as_on_cpu):
    """The chapters' live cells run it on the device they pick: every tensor where the model is,
    the held-out measures the CPU's up to rounding (routing near-ties may flip a few tokens)."""
    on_cuda_as_on_cpu(bs.BalanceScope, TINY, bs.REFERENCE, "rel_error")

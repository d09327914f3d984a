"""The adaptive-gating curriculum: per-sample two-expert shares, the order, the sampler."""

import pytest
import torch

from minimoe.analysis import RoutingRecorder
from minimoe.curriculum import CurriculumSampler, curriculum_order, two_expert_share
from minimoe.data import PAD_ID, VOCAB, make_multitask, seq_len
from minimoe.layer import MoEConfig
from minimoe.model import ModelConfig, TinyTransformer, set_router
from minimoe.routing import Adaptive
from minimoe.train import TrainConfig, train

# ---- the order, on constructed shares --------------------------------------------------------


def test_order_by_cosine_to_the_anchor():
    shares = torch.tensor([[0.5, 0.1], [0.1, 0.1], [0.2, 0.2], [0.0, 0.4], [0.3, 0.05]])
    # sums 0.6, 0.2, 0.4, 0.4, 0.35: the anchor is sample 1, direction (1, 1)
    # cosines: 0.06 / (0.510 * 0.141) = 0.832, 1, 1, 0.04 / (0.4 * 0.141) = 0.707,
    #          0.035 / (0.304 * 0.141) = 0.814
    assert curriculum_order(shares).tolist() == [1, 2, 0, 4, 3]


def test_order_ties_keep_index_order():
    shares = torch.tensor([[0.2, 0.2], [0.1, 0.1], [0.3, 0.3]])  # all parallel: cosine 1
    assert curriculum_order(shares).tolist() == [0, 1, 2]


def test_zero_anchor_orders_by_distance_to_it():
    # sample 1 sends no token to two experts: cosine to it is 0/0, so distance |C_n| decides,
    # and the other all-zero sample (3) is as close as the anchor itself
    shares = torch.tensor([[0.2, 0.0], [0.0, 0.0], [0.1, 0.1], [0.0, 0.0], [0.05, 0.0]])
    assert curriculum_order(shares).tolist() == [1, 3, 4, 2, 0]
    assert curriculum_order(torch.zeros(3, 2)).tolist() == [0, 1, 2]


def test_order_is_a_permutation_and_anchor_first():
    shares = torch.rand(50, 3, generator=torch.Generator().manual_seed(0))
    order = curriculum_order(shares)
    assert sorted(order.tolist()) == list(range(50))
    assert order[0] == shares.sum(1).argmin()


@pytest.mark.parametrize("bad", [torch.zeros(0, 2), torch.zeros(4)])
def test_order_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="shares must have shape"):
        curriculum_order(bad)


# ---- per-sample shares from a model ----------------------------------------------------------


def tiny_model(threshold=0.1, seed=0):
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=16, d_hidden=16, num_experts=4, router=Adaptive(threshold=threshold))
    return TinyTransformer(
        ModelConfig(vocab_size=len(VOCAB), block_size=seq_len(3), n_layers=2, n_heads=2, moe=moe)
    )


DATA = make_multitask(24, max_len=3, seed=0)


def test_shares_match_the_recorded_routing():
    model = tiny_model(threshold=0.02)
    valid = DATA.inputs != PAD_ID
    with torch.no_grad(), RoutingRecorder(model) as rec:
        model.eval()(DATA.inputs)
    shares = two_expert_share(model, DATA.inputs, valid, batch_size=5)  # chunked: same numbers
    assert shares.shape == (24, 2)
    for layer in range(2):
        two = (rec.routing(layer).mask.sum(1) == 2).view(24, -1)  # (N, L)
        by_hand = [(two[n] & valid[n]).sum() / valid[n].sum() for n in range(24)]
        torch.testing.assert_close(shares[:, layer], torch.stack(by_hand).float())
    assert 0 < shares.mean() < 1


def test_shares_at_threshold_0_and_1_and_empty_samples():
    assert (two_expert_share(tiny_model(0.0), DATA.inputs) == 0).all()
    assert (two_expert_share(tiny_model(1.0), DATA.inputs) == 1).all()
    nothing = torch.zeros_like(DATA.inputs, dtype=torch.bool)
    assert (two_expert_share(tiny_model(1.0), DATA.inputs, nothing) == 0).all()


def test_shares_leave_the_mode_as_it_was():
    model = tiny_model()
    two_expert_share(model.train(), DATA.inputs)
    assert model.training
    two_expert_share(model.eval(), DATA.inputs)
    assert not model.training


# ---- the sampler -----------------------------------------------------------------------------


def samples():
    return {"idx": DATA.inputs, "targets": DATA.targets}


def test_shuffled_epochs_visit_every_sample_once():
    sampler = CurriculumSampler(tiny_model(), samples(), batch_size=10, curriculum=False)
    g = torch.Generator().manual_seed(0)
    sizes, seen = [], []
    for _ in range(3):  # 24 samples in batches of 10: 10, 10, 4
        batch = sampler(g)
        sizes.append(len(batch["idx"]))
        seen += [DATA.inputs.tolist().index(row) for row in batch["idx"].tolist()]
    assert sizes == [10, 10, 4] and sampler.epochs == 1
    assert sorted(sampler.order.tolist()) == list(range(24))
    sampler(g)
    assert sampler.epochs == 2 and sampler.ranking_seconds == 0


def test_curriculum_epoch_follows_the_order_and_is_recomputed():
    model = tiny_model(threshold=0.05)
    valid = DATA.inputs != PAD_ID
    sampler = CurriculumSampler(model, samples(), batch_size=8, valid=valid)
    g = torch.Generator().manual_seed(0)
    expected = curriculum_order(two_expert_share(model, DATA.inputs, valid))
    batches = [sampler(g) for _ in range(3)]
    assert torch.equal(sampler.order, expected)
    assert torch.equal(torch.cat([b["idx"] for b in batches]), DATA.inputs[expected])
    assert torch.equal(batches[0]["targets"], DATA.targets[expected[:8]])
    set_router(
        model, Adaptive(threshold=0.2)
    )  # the model changes: the next epoch's order follows it
    sampler(g)
    assert sampler.epochs == 2 and len(sampler.mean_shares) == 2 and sampler.ranking_seconds > 0
    assert torch.equal(sampler.order, curriculum_order(two_expert_share(model, DATA.inputs, valid)))


def test_sampler_drives_train():
    model = tiny_model()
    sampler = CurriculumSampler(model, samples(), batch_size=8)
    history = train(model, sampler, TrainConfig(steps=7, progress=False))
    assert len(history.loss) == 7 and sampler.epochs == 3  # 3 batches per epoch


def test_sampler_rejects_bad_samples():
    with pytest.raises(ValueError, match="one length"):
        CurriculumSampler(tiny_model(), {"idx": DATA.inputs, "targets": DATA.targets[:3]}, 4)
    with pytest.raises(ValueError, match="batch_size"):
        CurriculumSampler(tiny_model(), samples(), 0)

"""GW-MoE: gw_broadcast on hand-worked examples, the broadcast layer against a dense oracle,
the fine-tuning recipe, and the chapter 3 experiment on a tiny scale."""

import json
import math

import pytest
import torch

from course import gw as gwx
from course import harness
from minimoe.layer import MoE, MoEConfig, moe_layers
from minimoe.model import ModelConfig, TinyTransformer
from minimoe.routing import GWBroadcast, TopK, gw_broadcast, normalized_entropy, top_k
from minimoe.train import TrainConfig, train
from minimoe.uncertainty import GWFineTuning

# Three tokens over E = 4 experts, worked by hand:
#   token 0: uniform P = (.25, .25, .25, .25), normalized entropy 1
#   token 1: logits (10, 1, 0, 0), P ~ one-hot on expert 0, normalized entropy 0.0016
#   token 2: P = (.4, .3, .2, .1), H = 1.2799 nats, normalized 1.2799 / ln 4 = 0.9233
P2 = [0.4, 0.3, 0.2, 0.1]


def logits():
    return torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 1.0, 0.0, 0.0], [math.log(p) for p in P2]])


def test_hand_worked_normalized_entropy():
    h = normalized_entropy(top_k(logits()).probs)
    torch.testing.assert_close(h, torch.tensor([1.0, 0.0016, 0.9233]), atol=1e-4, rtol=0)


def test_uncertain_tokens_go_to_every_expert_with_weights_p():
    r = gw_broadcast(top_k(logits(), k=2), threshold=0.9)
    assert r.broadcast.tolist() == [True, False, True]
    assert r.mask[0].all() and r.mask[2].all()
    torch.testing.assert_close(r.weights[0], torch.full((4,), 0.25))
    torch.testing.assert_close(r.weights[2], torch.tensor(P2))
    torch.testing.assert_close(r.weights.sum(1), torch.ones(3))


def test_certain_tokens_keep_the_base_routing():
    base = top_k(logits(), k=2)
    r = gw_broadcast(base, threshold=0.9)
    assert torch.equal(r.mask[1], base.mask[1]) and torch.equal(r.weights[1], base.weights[1])
    # top-2 of token 1: experts 0 and 1
    assert r.mask[1].tolist() == [True, True, False, False]


def test_threshold_between_tokens_2_and_0_broadcasts_only_token_0():
    r = gw_broadcast(top_k(logits(), k=1), threshold=0.95)
    assert r.broadcast.tolist() == [True, False, False]
    assert r.expert_counts.tolist() == [4, 1, 1]


def test_eval_is_the_base_routing():
    base = top_k(logits(), k=2)
    r = gw_broadcast(base, threshold=0.0, training=False)
    assert r is base and torch.equal(r.mask, base.mask)


def test_slot_cap_keeps_the_first_uncertain_tokens_of_each_sequence():
    # two sequences of 3 tokens: (uniform, certain, uncertain) each; cap 1 -> only token 0 of each
    two = torch.cat([logits(), logits()])
    r = gw_broadcast(top_k(two, k=1), threshold=0.9, max_slots=1, seq_len=3)
    assert r.broadcast.tolist() == [True, False, False, True, False, False]
    r = gw_broadcast(top_k(two, k=1), threshold=0.9, max_slots=2, seq_len=3)
    assert r.broadcast.tolist() == [True, False, True, True, False, True]
    r = gw_broadcast(top_k(two, k=1), threshold=0.9, max_slots=3)  # one sequence of 6
    assert r.broadcast.tolist() == [True, False, True, True, False, False]


def test_broadcast_layer_output_is_the_dense_mixture_for_uncertain_tokens():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_hidden=16, num_experts=4, router=TopK(k=2)))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(x @ moe.gate.weight.detach().T, dim=-1)  # (T, E)
    median = normalized_entropy(p).median().item()  # half the tokens uncertain
    moe.replace_config(router=GWBroadcast(TopK(k=2), threshold=median))
    moe.train()
    out = moe(x)
    dense = (p[:, :, None] * moe.experts.dense(x)).sum(1)  # sum_e p_e Expert_e(x)
    b = out.routing.broadcast
    assert 0 < b.sum() < len(b), "the test needs both kinds of tokens"
    torch.testing.assert_close(out.output[b], dense[b])
    sparse = top_k(x @ moe.gate.weight.detach().T, 2)  # certain tokens: plain top-2
    kept = (sparse.weights[:, :, None] * moe.experts.dense(x)).sum(1)
    torch.testing.assert_close(out.output[~b], kept[~b])
    assert out.stats.broadcast_ratio.item() == pytest.approx(b.float().mean().item())
    assert out.stats.uncertain_ratio.item() == out.stats.broadcast_ratio.item()  # no slot cap
    moe.eval()
    assert moe(x).stats.broadcast_ratio.item() == 0 and moe(x).stats.experts_per_token.item() == 2


# ---- the fine-tuning recipe -------------------------------------------------------------


def tiny_model():
    torch.manual_seed(0)
    return TinyTransformer(
        ModelConfig(
            n_layers=2,
            n_heads=2,
            block_size=16,
            moe=MoEConfig(d_model=16, d_hidden=16, num_experts=4),
        )
    )


def test_recipe_sets_every_layer_and_turns_z_loss_off():
    model = GWFineTuning(0.5, max_slots=3).apply(tiny_model())
    for layer in moe_layers(model):
        c = layer.config
        assert c.router == GWBroadcast(TopK(k=2), threshold=0.5, max_slots=3) and c.z_coef == 0.0
    keep = GWFineTuning(None, z_loss=True).apply(tiny_model())
    assert all(m.config.router == TopK(k=2) and m.config.z_coef == 1e-3 for m in moe_layers(keep))
    with pytest.raises(ValueError, match="measure"):
        GWFineTuning(0.5, measure="gini")
    assert all(m.config.balance_coef == 1e-2 for m in moe_layers(keep)), "None keeps the layer's"
    released = GWFineTuning(0.5, balance_coef=1e-3).apply(tiny_model())
    assert all(m.config.balance_coef == 1e-3 for m in moe_layers(released))
    with pytest.raises(ValueError, match="balance_coef=-1"):
        GWFineTuning(0.5, balance_coef=-1.0)


def test_frozen_router_does_not_move_and_broadcast_is_reported():
    model = GWFineTuning(0.0).apply(tiny_model())
    before = [m.gate.weight.detach().clone() for m in moe_layers(model)]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (4, 16), generator=g)
    seen = []
    train(
        model,
        lambda g: {"idx": idx, "targets": idx},
        TrainConfig(steps=3, freeze_router=True, progress=False),
        callback=lambda step, m, out: seen.append(
            [layer.stats.broadcast_ratio.item() for layer in out.layers]
        ),
    )
    assert all(torch.equal(b, m.gate.weight) for b, m in zip(before, moe_layers(model)))
    assert seen == [[1.0, 1.0]] * 3


# ---- the chapter 3 experiment, tiny -------------------------------------------------------


def test_split_plays_holds_out_one_whole_play():
    text = "A\n\nby William Shakespeare\n\nfirst\n\n\n\nB\n\nby William Shakespeare\n\nsecond\n"
    others, play = gwx.split_plays(text, held_out="B")
    assert play.startswith("B\n\nby") and "second" in play and "first" not in play
    assert others + play == text
    with pytest.raises(ValueError, match="C"):
        gwx.split_plays(text, held_out="C")


def tiny_experiment() -> gwx.GWExperiment:
    return gwx.GWExperiment(gwx.GWSetup(pretrain_steps=6, finetune_steps=4, batch_size=2))


def test_experiment_fine_tunes_each_arm_from_its_pretrained_model():
    exp = tiny_experiment()
    pre = exp.run_one("top-2", 0)
    assert pre["curve"]["step"][-1] == 6  # pretraining: its own steps
    pretrained = exp.pretrained("top-2", 0)
    _, held_out = exp.data(0)
    uncertain = gwx.uncertain_tokens(pretrained, held_out)
    assert pre["measures"] == pytest.approx(gwx.evaluate(pretrained, held_out, uncertain))
    rec = {name: exp.run_one(name, 0) for name in ("top-2 plain", "top-2 GW all")}
    assert [r["curve"]["step"][-1] for r in rec.values()] == [4, 4]  # counted from the branch
    assert rec["top-2 plain"]["extra"]["broadcast_ratio"] == [0.0, 0.0]
    assert rec["top-2 GW all"]["extra"]["broadcast_ratio"] == [1.0, 1.0]
    # the scored set is the pretrained router's, fixed: the same for every fine-tuning run
    assert exp.uncertain(0, held_out).equal(uncertain)
    flops = {r["measures"]["eval_flops_per_token"] for r in rec.values()}
    assert flops == {pre["measures"]["eval_flops_per_token"]}  # top-2 at evaluation
    tuned = exp.trained("top-2 GW", 0)[0]
    for a, b in zip(moe_layers(pretrained), moe_layers(tuned)):
        assert torch.equal(a.gate.weight, b.gate.weight)  # router frozen
        assert b.config.z_coef == 0.0 and b.config.balance_coef == gwx.RELEASED_BALANCE


def test_a_kept_checkpoint_gives_the_fine_tuning_of_the_trained_one():
    exp = tiny_experiment()
    trained = exp.run_one("switch plain", 1)  # trains the switch arm's pretraining first
    other = tiny_experiment()
    other.keep_snapshot("switch", 1, exp.pretrained("switch", 1))
    assert other.run_one("switch plain", 1)["curve"] == trained["curve"]
    with pytest.raises(ValueError, match="'top-3'"):
        other.keep_snapshot("top-3", 0, exp.pretrained("switch", 1))
    with pytest.raises(ValueError, match="arm must be one of"):
        exp.pretrained("switch plain", 1)


def test_family_pairs_each_broadcast_with_plain_fine_tuning_of_its_arm():
    assert len(gwx.FAMILY) == 12 and all(
        a.split()[0] == b.split()[0] and b.endswith("plain") for a, b, _ in gwx.FAMILY
    )
    assert gwx.RUNS["switch GW"].router == GWBroadcast(
        TopK(k=1, renormalize=False), threshold=gwx.THRESHOLD
    )


def test_command_writes_results_and_the_pretrained_checkpoint(tmp_path):
    from course.__main__ import main as course_main
    from minimoe.train import load_checkpoint

    ckpt = tmp_path / "pre.pt"
    flags = ["--pretrain-steps", "3", "--finetune-steps", "2", "--batch-size", "2"]
    results = course_main(
        ["gw", *flags, "--seeds", "0", "--runs", "top-2", "top-2 GW", "--out", str(tmp_path),
         "--no-progress", "--save-pretrained", str(ckpt)]
    )  # fmt: skip
    assert results.runs == ["top-2", "top-2 GW"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"]["top-2 GW"]["from_step"] == 3 and saved["setup"]["finetune_steps"] == 2
    exp = gwx.GWExperiment(gwx.GWSetup(pretrain_steps=3, finetune_steps=2, batch_size=2))
    assert harness.load(exp, tmp_path / "results.json").seeds == [0]
    for a, b in zip(load_checkpoint(ckpt).parameters(), exp.pretrained("top-2", 0).parameters()):
        assert torch.equal(a, b)


def test_inference_cost_refuses_an_unknown_reference():
    with pytest.raises(ValueError, match="'top-9'"):
        gwx.inference_cost({}, {"idx": torch.zeros(1, 4, dtype=torch.long)}, reference="top-9")


def test_a_checkpoint_that_is_no_byte_level_transformer_is_refused(tmp_path):
    from minimoe.model import MoERegressor
    from minimoe.train import save_checkpoint

    ckpt = tmp_path / "toy.pt"
    save_checkpoint(MoERegressor(4, 2, MoEConfig(d_model=4, d_hidden=4, num_experts=4)), ckpt)
    with pytest.raises(ValueError, match="holds a MoERegressor; GW fine-tuning needs a byte-level"):
        gwx.load_pretrained(ckpt)

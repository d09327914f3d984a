"""Expert parallelism against the single-process layer, on 2 real gloo processes (CPU).

One launch of 2 processes runs every distributed check (they share the start-up cost, about
10 s); ``launch`` kills the workers after its timeout, so a hung collective fails the test.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import warnings

import pytest
import torch
import torch.distributed as dist
from test_routers import CountingTopK

from minimoe import cli as train_cli
from minimoe.launcher import FAILURE_GRACE_S
from minimoe.layer import MoE, MoEConfig
from minimoe.model import ModelConfig, TinyTransformer
from minimoe.parallel import (
    Exchange,
    ExpertParallelMoE,
    clip_grad_norm_,
    launch,
    make_expert_parallel,
    pairs_to_ranks,
    shard_batch,
    sync_gradients,
)
from minimoe.routing import (
    Adaptive,
    ExpertThreshold,
    GWBroadcast,
    NoisyTopK,
    ReMoE,
    ScoreTopK,
    TopK,
    TopP,
    expert_cutoff,
)
from minimoe.train import load_checkpoint

ATOL = 1e-5
# name -> (MoEConfig overrides, how the case runs)
CASES = {
    "top_k": ({}, {}),
    "switch_top_1": ({"router": TopK(k=1, renormalize=False)}, {}),
    "top_p": ({"router": TopP(p=0.5)}, {}),
    "adaptive": ({"router": Adaptive(threshold=0.2)}, {}),
    "gw_broadcast": (
        {"router": GWBroadcast(TopK(k=1, renormalize=True), threshold=0.8, max_slots=2)},
        {},
    ),
    "noisy_top_k_eval": ({"router": NoisyTopK()}, {"train": False}),
    "gelu_experts": ({"activation": "gelu", "dispatch": "loop"}, {}),
    # replicated like the router: its gradients sum over ranks
    "shared_expert": ({"shared_hidden": 24, "shared_gate": True}, {}),
    # MoE++'s free experts: replicated, run on the token's own rank
    "free_experts": (
        {"router": ScoreTopK(k=2, null_experts=1, identity_experts=1, constant_experts=2)},
        {"free_logits": True},
    ),
    "idle_rank": ({}, {"zero_gate": True}),  # ties: every token picks experts 0 and 1, on rank 0
    "idle_rank_input_without_grad": ({}, {"zero_gate": True, "input_grad": False}),
    # per rank by design: each rank's capacity and noise come from its own tokens
    "capacity_per_rank": ({"capacity_factor": 1.0}, {"per_shard": True}),
    "noisy_top_k_train": ({"router": NoisyTopK()}, {"per_shard": True}),
}
TRAIN_ARGS = [
    *"--steps 5 --batch-size 4 --block-size 16 --layers 1 --heads 2 --d-model 32 --d-hidden 32 --experts 4 --balance-coef 0 --no-progress --device cpu".split()
]


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    a = torch.zeros_like(b) if a is None else a  # no gradient = a zero gradient
    b = torch.zeros_like(a) if b is None else b
    return (a - b).abs().max().item()


def _compare(
    overrides: dict,
    train: bool = True,
    zero_gate: bool = False,
    input_grad: bool = True,
    per_shard: bool = False,
    free_logits: bool = False,
) -> dict[str, float]:
    """Max |difference| between this rank's expert-parallel layer and the single-process layer."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_hidden=32, num_experts=4, **overrides)).train(train)
    with torch.no_grad():
        moe.gate.weight.mul_(0.0 if zero_gate else 3.0)  # sharper than at init: varied expert sets
        if free_logits:  # the free experts' router rows start at 0: let them compete
            moe.gate_extra.weight.normal_()
    x, upstream = torch.randn(4, 6, 16), torch.randn(4, 6, 16)  # (B, L, d) the global batch
    ep = ExpertParallelMoE.from_moe(moe)
    mine = slice(rank * 4 // world, (rank + 1) * 4 // world)  # this rank's sequences
    if per_shard:
        x, upstream = x[mine], upstream[mine]
        mine = slice(None)
    x_ep = x[mine].clone().requires_grad_(input_grad)
    x_ref = x.clone().requires_grad_(input_grad)
    torch.manual_seed(1)
    out = ep(x_ep)
    (out.output * upstream[mine]).sum().backward()
    torch.manual_seed(1)
    ref = moe(x_ref)
    (ref.output * upstream).sum().backward()

    # over all tokens: the router's gradient and the load sum over ranks (and so do an expert's
    # gradients, but the backward all_to_all already did that sum for the expert-parallel layer)
    summed = [ep.gate.weight.grad.clone(), out.stats.tokens_per_expert.clone()]
    ref_grads = [moe.experts.gate_up.grad, moe.experts.down.grad, moe.gate.weight.grad]
    ref_summed = [*ref_grads, ref.stats.tokens_per_expert.clone()] if per_shard else []
    # the shared expert and its gate: replicated, so summed over ranks like the router
    replicated = ("shared", "constants")  # the shared expert, MoE++'s constant experts
    shared = {n: p.grad.clone() for n, p in ep.named_parameters() if n.startswith(replicated)}
    ref_shared = {n: p.grad.clone() for n, p in moe.named_parameters() if n.startswith(replicated)}
    for t in (
        summed + ref_summed + [*shared.values()] + ([*ref_shared.values()] if per_shard else [])
    ):
        dist.all_reduce(t)
    experts = slice(ep.experts.first, ep.experts.first + ep.experts.local.num_experts)
    sent = ep.last_exchange.sent
    diffs = {
        "output": _max_diff(out.output, ref.output[mine]),
        "gate_up_grad": _max_diff(ep.experts.local.gate_up.grad, ref_grads[0][experts]),
        "down_grad": _max_diff(ep.experts.local.down.grad, ref_grads[1][experts]),
        "router_grad": _max_diff(summed[0], ref_grads[2]),
        "tokens_per_expert": _max_diff(
            summed[1], ref_summed[-1] if per_shard else ref.stats.tokens_per_expert
        ),
        "pairs_sent": abs(sum(sent) - (out.routing.mask.sum() - out.stats.dropped_pairs).item()),
    }
    if overrides.get("capacity_factor") is None:  # dropless: the routing mask is what travels
        diffs["exchange_vs_mask"] = _max_diff(
            torch.tensor(sent), pairs_to_ranks(out.routing.mask, world)
        )
    if input_grad:
        diffs["input_grad"] = _max_diff(x_ep.grad, x_ref.grad[mine])
    for name, grad in shared.items():
        diffs[f"{name}_grad"] = _max_diff(grad, ref_shared[name])
    if free_logits:  # 0 when the constant experts ran on some token
        diffs["constant_experts_unused"] = float(not out.routing.constant.ne(0).any())
    if ep.shared is not None:  # 0 when replicated_parameters holds every shared parameter
        replicated = {id(p) for p in ep.replicated_parameters()}
        diffs["shared_not_replicated"] = float(
            sum(id(p) not in replicated for n, p in ep.named_parameters() if n.startswith("shared"))
        )
    if per_shard:
        diffs["aux_loss"] = _max_diff(out.aux_loss, ref.aux_loss)
    return diffs


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _run_train(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", *argv])
    return args.func(args)


def _stateful_check() -> float:
    """A stateful router's update from the expert-parallel layer equals the single-process one."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_hidden=32, num_experts=4, router=CountingTopK(k=2)))
    x = torch.randn(4, 6, 16)
    ep = ExpertParallelMoE.from_moe(moe)
    mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
    for _ in range(2):
        ep.update_router_state(ep(x[mine]).stats)  # what train() does after each optimizer step
        moe.update_router_state(moe(x).stats)
    assert moe.router_state.seen.sum() == 2 * 24 * 2  # every token twice, two experts each
    return _max_diff(ep.router_state.seen, moe.router_state.seen)


@dataclasses.dataclass(frozen=True)
class StatsTopK(TopK):
    """Top-k that keeps the float statistics its update sees (a mean, not a count)."""

    def init_state(self, num_experts):
        return {"experts_per_token": torch.zeros(()), "broadcast_ratio": torch.zeros(())}

    def __call__(self, logits, *, training, seq_len=None, state):
        return super().__call__(logits, training=training, seq_len=seq_len)

    def update_state(self, state, stats):
        state["experts_per_token"].copy_(stats.experts_per_token)
        state["broadcast_ratio"].copy_(stats.broadcast_ratio)


def _float_stats_check() -> float:
    """A stateful router sees the same float statistics (means over tokens) in both layers."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_hidden=32, num_experts=4, router=StatsTopK(k=2)))
    x = torch.randn(4, 6, 16)
    ep = ExpertParallelMoE.from_moe(moe)
    ep.update_router_state(ep(x[rank * 4 // world : (rank + 1) * 4 // world]).stats)
    moe.update_router_state(moe(x).stats)
    assert moe.router_state.experts_per_token == 2.0  # top-2: a mean, which a sum would double
    return _max_diff(ep.router_state.experts_per_token, moe.router_state.experts_per_token)


def _remoe_check() -> float:
    """ReMoE's L1 coefficient after updates from the expert-parallel layer equals the
    single-process one. Its update reads the mean experts per token, averaged over the ranks:
    with the target between that mean and twice it, a sum over the 2 ranks would multiply the
    coefficient where the mean divides it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    target = 3.0
    moe = MoE(MoEConfig(d_model=16, d_hidden=32, num_experts=4, router=ReMoE(target)))
    x = torch.randn(4, 6, 16)
    mean = moe(x).stats.experts_per_token.item()
    assert target / world < mean < target, mean  # (a sum over the ranks would cross the target)
    ep = ExpertParallelMoE.from_moe(moe)
    mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
    for _ in range(3):
        ep.update_router_state(ep(x[mine]).stats)
        moe.update_router_state(moe(x).stats)
    assert moe.router_state.l1_coef < ReMoE().l1_init  # divided: the mean is below the target
    return _max_diff(ep.router_state.l1_coef, moe.router_state.l1_coef)


def _threshold_check() -> dict[str, float]:
    """Expert threshold routing's thresholds after updates from the expert-parallel layer equal
    the single-process ones. A cutoff is an order statistic of a column over all the step's
    tokens: the mean of the ranks' own cutoffs (``averaging_gap``) is another number."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    rule = ExpertThreshold(experts_per_token=1.0, ema_decay=0.5)
    moe = MoE(MoEConfig(d_model=16, d_hidden=32, num_experts=4, router=rule))
    with torch.no_grad():
        moe.gate.weight.mul_(3.0)
    x = torch.randn(4, 6, 16)
    ep = ExpertParallelMoE.from_moe(moe)
    mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
    with torch.no_grad():
        averaged = expert_cutoff(ep.router_logits(x[mine].reshape(-1, 16)), 1.0)
        dist.all_reduce(averaged)
        whole = expert_cutoff(moe.router_logits(x.reshape(-1, 16)), 1.0)
    gap = (averaged / world - whole).abs().max().item()
    for _ in range(3):
        ep.update_router_state(ep(x[mine]).stats)
        moe.update_router_state(moe(x).stats)
    assert moe.router_state.updates.item() == 3
    return {
        "threshold": _max_diff(ep.router_state.threshold, moe.router_state.threshold),
        "averaging_gap": gap,
    }


def _compute_target_check() -> float:
    """LongCat-Flash's compute-target bias after updates from the expert-parallel layer equals
    the single-process one (its update reads token counts, summed over the ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    rule = ScoreTopK(k=2, identity_experts=2, selection_bias=True, bias_rate=0.1,
                     experts_per_token=1.0, renormalize=False)  # fmt: skip
    moe = MoE(MoEConfig(d_model=16, d_hidden=32, num_experts=4, router=rule))
    with torch.no_grad():
        moe.gate_extra.weight.normal_()
    x = torch.randn(4, 6, 16)
    ep = ExpertParallelMoE.from_moe(moe)
    mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
    for _ in range(3):
        ep.update_router_state(ep(x[mine]).stats)
        moe.update_router_state(moe(x).stats)
    assert moe.router_state.bias.abs().sum() > 0
    return _max_diff(ep.router_state.bias, moe.router_state.bias)


def _clip_check() -> dict[str, float]:
    """clip_grad_norm_ over the expert-parallel layer = torch's over the single-process one."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_hidden=32, num_experts=4, shared_hidden=16))
    x = torch.randn(4, 6, 16)
    ep = ExpertParallelMoE.from_moe(moe)
    ep(x[rank * 4 // world : (rank + 1) * 4 // world]).output.square().mean().backward()
    sync_gradients(ep)  # the gradients of the mean loss over the equal shards
    total = clip_grad_norm_(ep, max_norm=1e-3)  # far below the norm: every gradient is scaled
    moe(x).output.square().mean().backward()
    ref_total = torch.nn.utils.clip_grad_norm_(moe.parameters(), max_norm=1e-3)
    experts = slice(ep.experts.first, ep.experts.first + ep.experts.local.num_experts)
    return {
        "total_norm": _max_diff(total, ref_total),
        "gate": _max_diff(ep.gate.weight.grad, moe.gate.weight.grad),
        "experts": _max_diff(ep.experts.local.down.grad, moe.experts.down.grad[experts]),
        "shared": _max_diff(ep.shared.down.grad, moe.shared.down.grad),
    }


def _all_checks(out_dir: str) -> dict:
    """Runs on each of the 2 ranks."""
    rank = dist.get_rank()
    results = {name: _compare(overrides, **how) for name, (overrides, how) in CASES.items()}
    results["stateful"] = _stateful_check()
    results["errors"] = {
        "indivisible": _error(
            lambda: ExpertParallelMoE(MoEConfig(num_experts=3, router=TopK(k=2)))
        ),
        "mismatch": _error(lambda: ExpertParallelMoE(MoEConfig(router=TopP(p=0.3 + 0.1 * rank)))),
        "batch": _error(lambda: shard_batch({"idx": torch.zeros(3, 4)})),
        # the same MoE layers in models that differ elsewhere: the vocabulary, the layer count
        "vocabulary": _error(lambda: make_expert_parallel(_lm(vocab_size=32 * (rank + 1)))),
        "layers": _error(lambda: make_expert_parallel(_lm(n_layers=1 + rank))),
    }
    results["float_stats"] = _float_stats_check()
    results["remoe"] = _remoe_check()
    results["threshold"] = _threshold_check()
    results["compute_target"] = _compute_target_check()
    results["clip"] = _clip_check()
    torch.manual_seed(rank)  # different weights on each rank: make_expert_parallel takes rank 0's
    model = make_expert_parallel(torch.nn.Sequential(MoE(MoEConfig(num_experts=4))))
    weights = model[0].gate.weight.detach().clone()
    dist.all_reduce(weights, op=dist.ReduceOp.MAX)
    results["same_router"] = _max_diff(weights, model[0].gate.weight)
    results["train"] = _run_train([*TRAIN_ARGS, "--expert-parallel", "--out", out_dir])
    return results


def _lm(**changes) -> TinyTransformer:
    moe = MoEConfig(d_model=16, d_hidden=16, num_experts=4)
    return TinyTransformer(ModelConfig(**{"vocab_size": 32, "n_heads": 2, "moe": moe} | changes))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], object]:
    out = tmp_path_factory.mktemp("expert_parallel")
    return launch(_all_checks, world_size=2, args=(str(out),), timeout=60), out


@pytest.mark.parametrize("case", CASES)
def test_equals_single_process(two_ranks, case):
    for rank, results in enumerate(two_ranks[0]):
        if "shared_hidden" in CASES[case][0]:  # the shared expert's gradients were compared
            assert {"shared.gate_up_grad", "shared_gate.weight_grad"} <= set(results[case])
        bad = {k: v for k, v in results[case].items() if not v <= ATOL}
        assert not bad, f"rank {rank}: {bad}"


def test_stateful_router_update_equals_single_process(two_ranks):
    assert all(results["stateful"] == 0.0 for results in two_ranks[0])


def test_clear_errors_on_every_rank(two_ranks):
    for results in two_ranks[0]:
        errors = results["errors"]
        assert "num_experts=3 is not divisible by the world size 2" in errors["indivisible"]
        assert "differs across ranks in ['router']" in errors["mismatch"]
        assert "not divisible by the world size 2" in errors["batch"]
        assert results["same_router"] == 0.0


def test_models_that_differ_outside_the_moe_config_are_refused_on_every_rank(two_ranks):
    for results in two_ranks[0]:
        errors = results["errors"]
        assert re.search(r"rank 0 has 'parameter tok_emb.weight: \(32, 16\)", errors["vocabulary"])
        assert "rank 1 has 'parameter tok_emb.weight: (64, 16)" in errors["vocabulary"]
        assert "model differs across ranks" in errors["layers"]


def test_float_statistics_are_averaged_over_ranks_not_summed(two_ranks):
    assert all(results["float_stats"] == 0.0 for results in two_ranks[0])


def test_remoe_coefficient_moves_as_in_one_process(two_ranks):
    assert all(results["remoe"] == 0.0 for results in two_ranks[0])


def test_expert_thresholds_move_as_in_one_process(two_ranks):
    for results in two_ranks[0]:
        assert results["threshold"]["threshold"] <= 1e-6, results["threshold"]
        # the old rule, each rank's cutoffs averaged, would have moved them elsewhere
        assert results["threshold"]["averaging_gap"] > 1e-2, results["threshold"]


def test_compute_target_bias_moves_as_in_one_process(two_ranks):
    assert all(results["compute_target"] <= 1e-6 for results in two_ranks[0])


def test_clipping_counts_every_ranks_experts_once(two_ranks):
    for results in two_ranks[0]:
        assert max(results["clip"].values()) <= 1e-6, results["clip"]


def test_training_matches_single_process(two_ranks, tmp_path):
    ranks, ep_out = two_ranks
    ep = ranks[0]["train"]
    assert ranks[1]["train"]["world_size"] == 2  # the other rank returns the traffic only
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker; two threads crawl on a machine that others keep busy
    try:
        single = _run_train([*TRAIN_ARGS, "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert max(ep["expert_parallel"]["max_abs_diff_vs_single_process"].values()) <= ATOL
    assert math.isclose(ep["train_loss"], single["train_loss"], abs_tol=1e-5)
    assert math.isclose(ep["val_loss"], single["val_loss"], abs_tol=1e-5)
    ep_model, single_model = (
        load_checkpoint(ep_out / "model.pt"),
        load_checkpoint(tmp_path / "model.pt"),
    )
    for (name, p), q in zip(ep_model.named_parameters(), single_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=name)
    traffic = ep["expert_parallel"]
    assert (
        all(b > 0 for b in traffic["bytes_sent_per_step"]) and len(traffic["pairs_per_step"]) == 2
    )


def test_expert_biases_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="expert_bias=True"):
        ExpertParallelMoE(MoEConfig(activation="relu", expert_bias=True))


def test_not_initialised_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="initialised process group"):
        ExpertParallelMoE(MoEConfig())
    with pytest.raises(RuntimeError, match="initialised process group"):
        make_expert_parallel(MoE(MoEConfig()))


def test_exchange_bytes():
    # rank 0 of 2 sends 5 pairs to itself and 3 to rank 1, and serves 5 + 4 pairs
    ex = Exchange(rank=0, sent=(5, 3), received=(5, 4), row_bytes=64 * 4, count_bytes=4 * 8)
    assert ex.load == 9
    assert ex.bytes_sent == (3 + 4) * 256 + 32  # rows out, rows back, split sizes; self excluded
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert pairs_to_ranks(mask, 2).tolist() == [3, 2]
    assert pairs_to_ranks(mask, 4).tolist() == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="not divisible"):
        pairs_to_ranks(mask, 3)


def _sleep_on_rank_1() -> None:
    if dist.get_rank() == 1:
        import time

        time.sleep(120)
    dist.barrier()


def test_hang_fails_instead_of_blocking():
    with pytest.raises(TimeoutError, match="killed"):
        launch(_sleep_on_rank_1, world_size=2, timeout=3)


def _nccl_check() -> dict:
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_hidden=32, num_experts=4)).cuda()
    x = torch.randn(8, 16, device="cuda")
    ep = ExpertParallelMoE.from_moe(moe)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
    return {"output": _max_diff(ep(x[mine]).output, moe(x).output[mine])}


@pytest.mark.gpu
def test_nccl_equals_single_process():
    world = min(2, torch.cuda.device_count())
    for results in launch(_nccl_check, world_size=world, timeout=120, backend="nccl"):
        assert results["output"] <= ATOL


def _fail_on_rank_1() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom")
    dist.barrier()  # rank 0 waits for rank 1, whose exit breaks the connection


def test_failing_rank_error_reaches_the_caller():
    with pytest.raises(ValueError, match=r"rank 1 .*boom") as info:
        launch(_fail_on_rank_1, world_size=2, timeout=30)
    assert "_fail_on_rank_1" in str(info.value.__cause__)  # the worker's traceback


def _exit_quietly_on_rank_1() -> int:
    if dist.get_rank() == 1:
        os._exit(0)  # no result, no exception, status 0
    return 0


def _one_forward_more_on_rank_0() -> int:
    torch.manual_seed(0)
    ep = ExpertParallelMoE.from_moe(MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=2)))
    for _ in range(1 + (dist.get_rank() == 0)):
        ep(torch.randn(3, 8))
    return dist.get_rank()


@pytest.mark.slow  # two launches
def _rank_1_aborts_on_exit_while_rank_0_works() -> int:
    import atexit
    import time

    if dist.get_rank() == 1:
        atexit.register(os.abort)  # after its result is sent: a teardown that aborts
    else:
        time.sleep(FAILURE_GRACE_S + 2)  # still working when rank 1 dies
    return dist.get_rank()


def test_every_ranks_fate_is_reported():
    with pytest.raises(
        RuntimeError, match="rank 1 exited with status 0 without returning a result"
    ):
        launch(_exit_quietly_on_rank_1, world_size=2, timeout=30)
    with pytest.raises(Exception, match=r"the same number of times.*rank 1 returned") as info:
        launch(_one_forward_more_on_rank_0, world_size=2, timeout=30)
    assert "rank 0 of 2 failed" in str(info.value)
    # a rank that returned and then died on its way out is no failure: the others go on
    assert launch(_rank_1_aborts_on_exit_while_rank_0_works, world_size=2, timeout=60) == [0, 1]


def _abort_once(marker: str) -> str:
    """Unpickled in each new process before it joins: the first one to get here dies (SIGABRT)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return marker
    os.abort()


class _AbortsOnce:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_abort_once, (self.marker,))


def _rank(_: object) -> int:
    return dist.get_rank()


@pytest.mark.slow  # the group starts twice
def test_a_rank_that_dies_at_start_up_restarts_the_group(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranks = launch(_rank, world_size=2, args=(_AbortsOnce(str(tmp_path / "died")),), timeout=30)
    assert ranks == [0, 1]
    assert any("died by signal SIGABRT before joining" in str(w.message) for w in caught)

"""Capacity, sorting and the two combine paths against hand counts and a dense oracle."""

import re

import pytest
import torch

from minimoe.dispatch import (
    apply_capacity,
    combine,
    combine_loop,
    combine_sorted,
    expert_capacity,
    sort_by_expert,
)
from minimoe.experts import Experts
from minimoe.routing import top_k, top_p

# ---- capacity --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capacity_factor, tokens, k, experts, expected",
    [
        (1.25, 10, 2, 4, 7),  # ceil(1.25 * 20 / 4) = ceil(6.25)
        (1.0, 8, 1, 4, 2),
        (1.0, 8, 2, 4, 4),  # k counts: twice the pairs, twice the slots
        (2.0, 3, 1, 4, 2),  # ceil(1.5)
        (0.1, 4, 1, 4, 1),  # ceil(0.1): never 0 slots for a non-empty batch
        (1.0, 0, 2, 4, 0),
    ],
)
def test_expert_capacity(capacity_factor, tokens, k, experts, expected):
    assert expert_capacity(tokens * k, experts, capacity_factor) == expected


def test_expert_capacity_none_is_dropless():
    assert expert_capacity(20, 4, None) is None
    mask = torch.ones(3, 2, dtype=torch.bool)
    assert torch.equal(apply_capacity(mask, torch.full((3, 2), 0.5), None), mask)


@pytest.mark.parametrize("capacity_factor", [0, 0.0, -1.0])
def test_expert_capacity_rejects_non_positive(capacity_factor):
    with pytest.raises(ValueError, match=re.escape(f"capacity_factor={capacity_factor!r}")):
        expert_capacity(20, 4, capacity_factor)


def test_apply_capacity_first_choices_before_second_choices():
    # T = 4 tokens, both experts each, capacity 2.
    # expert 0: first choice of t0, t2, t3, second choice of t1 -> keeps t0, t2
    #           (t2's first choice beats the earlier t1's second choice; t3 comes too late)
    # expert 1: first choice of t1, second choice of t0, t2, t3 -> keeps t1, then t0
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.9, 0.1]])
    mask = torch.ones(4, 2, dtype=torch.bool)
    kept = apply_capacity(mask, probs, capacity=2)
    assert kept.tolist() == [[True, True], [False, True], [True, False], [False, False]]
    assert (mask & ~kept).sum() == 4  # dropped pairs
    assert (~kept.any(dim=1)).sum() == 1  # t3 lost both experts


def test_apply_capacity_top_1_earlier_tokens_first():
    first = [0, 0, 1, 0, 0, 2]  # each token's only expert, E = 3, capacity 2
    mask = torch.nn.functional.one_hot(torch.tensor(first), 3).bool()
    kept = apply_capacity(mask, torch.full((6, 3), 1 / 3), capacity=2)
    assert kept.any(dim=1).tolist() == [True, True, True, False, False, True]
    assert not (kept & ~mask).any()
    assert apply_capacity(mask, torch.full((6, 3), 1 / 3), capacity=6).equal(mask)


# ---- sorting ---------------------------------------------------------------------------


def test_sort_by_expert():
    mask = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    pairs = sort_by_expert(mask)
    assert pairs.counts == [3, 1, 3]
    assert pairs.expert.tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert pairs.token.tolist() == [0, 2, 4, 2, 0, 1, 4]  # token order within each expert


def test_sort_by_expert_empty():
    pairs = sort_by_expert(torch.zeros(0, 3, dtype=torch.bool))
    assert pairs.counts == [0, 0, 0] and pairs.token.numel() == 0


# ---- combine ---------------------------------------------------------------------------

T, E, D = 12, 4, 6


def decision(kind):
    """(mask, weights) of one routing; weights zeroed where capacity dropped a pair."""
    logits = 2 * torch.randn(T, E, generator=torch.Generator().manual_seed(1))
    if kind == "top_p":
        r = top_p(logits, 0.7)
        return r.mask, r.weights
    r = top_k(logits, 2)
    if kind == "top_2":
        return r.mask, r.weights
    if kind == "capacity":  # 4 slots for 24 pairs: pairs are dropped
        kept = apply_capacity(r.mask, r.probs, capacity=4)
        assert (r.mask & ~kept).sum() > 0
        return kept, r.weights * kept
    if kind == "one_expert_idle":
        mask = r.mask.clone()
        mask[:, 0] = False
        return mask, r.weights * mask
    raise AssertionError(kind)


def dense_oracle(x, weights, mask, experts):
    """sum over all e of weights[t, e] * Expert_e(x_t), with weights 0 off the mask."""
    return ((weights * mask)[:, :, None] * experts.dense(x)).sum(dim=1)  # (T, d)


def outputs_and_grads(fn, x, weights, mask, experts):
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    out = fn(x, weights, mask, experts)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((out * upstream).sum(), [x, weights, *experts.parameters()])
    return out, grads


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("kind", ["top_2", "top_p", "capacity", "one_expert_idle"])
def test_combine_paths_match_each_other_and_dense_oracle(kind, activation):
    torch.manual_seed(0)
    experts = Experts(num_experts=E, d_model=D, d_hidden=5, activation=activation)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    mask, weights = decision(kind)
    sorted_out, sorted_grads = outputs_and_grads(combine_sorted, x, weights, mask, experts)
    loop_out, loop_grads = outputs_and_grads(combine_loop, x, weights, mask, experts)
    oracle_out, oracle_grads = outputs_and_grads(dense_oracle, x, weights, mask, experts)
    torch.testing.assert_close(sorted_out, loop_out)
    torch.testing.assert_close(sorted_out, oracle_out)
    for name, s, loop, oracle in zip(
        ["x", "weights", "gate_up", "down"], sorted_grads, loop_grads, oracle_grads
    ):
        torch.testing.assert_close(s, loop, msg=lambda m, name=name: f"grad {name}: {m}")
        torch.testing.assert_close(s, oracle, msg=lambda m, name=name: f"grad {name}: {m}")
    nonzero = sorted_out.abs().sum(dim=1) > 0
    assert not nonzero[~mask.any(dim=1)].any()  # unrouted tokens give 0
    if activation != "relu":  # a routed token may have every relu unit at 0
        assert nonzero.equal(mask.any(dim=1))


@pytest.mark.parametrize("path", ["sorted", "loop"])
def test_combine_with_empty_mask_is_zero(path):
    experts = Experts(num_experts=E, d_model=D, d_hidden=5)
    x = torch.randn(T, D)
    out = combine(x, torch.zeros(T, E), torch.zeros(T, E, dtype=torch.bool), experts, path=path)
    assert out.shape == (T, D) and not out.any()


def test_combine_unknown_path_raises():
    experts = Experts(num_experts=E, d_model=D, d_hidden=5)
    with pytest.raises(ValueError, match="'gather'"):
        combine(
            torch.randn(T, D),
            torch.zeros(T, E),
            torch.zeros(T, E, dtype=torch.bool),
            experts,
            path="gather",
        )


@pytest.mark.gpu
def test_grouped_mm_path_matches_the_loop_in_bfloat16():
    from minimoe import experts as experts_module

    torch.manual_seed(0)
    ex = Experts(num_experts=4, d_model=64, d_hidden=128).cuda()
    x = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    counts = [100, 0, 150, 50]
    assert experts_module._grouped_mm_usable(x, 64, 128), "this GPU should take the grouped path"
    grouped = ex.grouped(x, counts)
    assert not experts_module._GROUPED_MM_FAILED, experts_module._GROUPED_MM_FAILED
    loop = torch.cat([ex.expert(e, xe.float()) for e, xe in enumerate(x.split(counts)) if len(xe)])
    torch.testing.assert_close(grouped.float(), loop, atol=5e-2, rtol=5e-2)


def _grouped_mm_runs_on_cpu() -> bool:
    import torch.nn.functional as F

    if not hasattr(F, "grouped_mm"):
        return False
    try:
        F.grouped_mm(
            torch.ones(2, 8, dtype=torch.bfloat16),
            torch.ones(1, 8, 8, dtype=torch.bfloat16),
            offs=torch.tensor([2], dtype=torch.int32),
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="this torch has no CPU F.grouped_mm")
def test_grouped_mm_formulation_matches_the_per_expert_path_with_gradients():
    """The GPU path's arithmetic in bfloat16 (offsets, transposes, an expert with no rows), run
    on the CPU, so a machine without a GPU still tests everything but the CUDA kernel."""
    torch.manual_seed(0)
    ex = Experts(num_experts=4, d_model=64, d_hidden=128)
    x = torch.randn(300, 64)
    counts = [100, 0, 150, 50]

    x_ref = x.clone().requires_grad_()
    ref = ex.grouped(x_ref, counts)  # float32, one matmul per expert
    ref_grads = torch.autograd.grad(ref.sum(), [x_ref, ex.gate_up, ex.down])

    x_bf16 = x.to(torch.bfloat16).requires_grad_()
    out = ex._grouped_mm(x_bf16, counts)
    grads = torch.autograd.grad(out.float().sum(), [x_bf16, ex.gate_up, ex.down])

    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    assert grads[0].dtype == torch.bfloat16, "x's gradient has x's dtype"
    assert grads[1].dtype == grads[2].dtype == torch.float32, "weight gradients stay float32"
    for name, g, r in zip(["x", "gate_up", "down"], grads, ref_grads):
        torch.testing.assert_close(
            g.float(), r, atol=0.1, rtol=5e-2, msg=lambda m, name=name: f"grad {name}: {m}"
        )
    assert grads[1][1].abs().sum() == 0 and grads[2][1].abs().sum() == 0, "expert 1 had no rows"


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="this torch has no CPU F.grouped_mm")
def test_cpu_float32_takes_the_grouped_path_and_matches_one_matmul_per_expert(monkeypatch):
    from minimoe import experts as experts_module

    torch.manual_seed(0)
    ex = Experts(num_experts=4, d_model=64, d_hidden=128)
    x = torch.randn(300, 64)
    counts = [100, 0, 150, 50]
    assert experts_module._grouped_mm_usable(x, 64, 128)
    assert not experts_module._grouped_mm_usable(x.double(), 64, 128), "float64: the loop"
    assert not experts_module._grouped_mm_usable(x, 64, 100), "unaligned rows: the loop"

    def run(grouped_ok: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(experts_module, "_grouped_mm_usable", lambda *a: grouped_ok)
        xr = x.clone().requires_grad_()
        out = ex.grouped(xr, counts)
        out.sum().backward()  # a broadcast gradient: grouped_mm's backward alone refuses it
        grads = [xr.grad, ex.gate_up.grad, ex.down.grad]
        ex.zero_grad(set_to_none=True)
        return [out.detach(), *grads]

    calls = []
    original = experts_module.Experts._grouped_mm
    monkeypatch.setattr(
        experts_module.Experts, "_grouped_mm", lambda s, x, c: calls.append(1) or original(s, x, c)
    )
    fast, loop = run(True), run(False)
    assert calls == [1], "the grouped path ran once, the loop did not call it"
    monkeypatch.setattr(experts_module, "_grouped_mm_usable", lambda *a: True)
    many = experts_module.CPU_GROUPED_MAX_ROWS * 4 + 1  # large experts on CPU: the loop is faster
    ex.grouped(torch.randn(many, 64), [many, 0, 0, 0])
    assert calls == [1], "above CPU_GROUPED_MAX_ROWS rows per expert, the CPU keeps the loop"
    for name, a, b in zip(["out", "x", "gate_up", "down"], fast, loop):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert fast[2][1].abs().sum() == 0, "expert 1 had no rows: no gradient"


@pytest.mark.parametrize("capacity_factor", [float("inf"), float("nan"), "1.0", True])
def test_expert_capacity_rejects_non_finite_and_non_numbers(capacity_factor):
    with pytest.raises(ValueError, match=re.escape(f"capacity_factor={capacity_factor!r}")):
        expert_capacity(20, 4, capacity_factor)


@pytest.mark.parametrize(
    "num_pairs, num_experts, error, match",
    [
        (-1, 4, ValueError, "num_pairs must be >= 0, got num_pairs=-1"),
        (20.0, 4, TypeError, "num_pairs must be an int, got num_pairs=20.0"),
        (20, 0, ValueError, "num_experts must be >= 1, got num_experts=0"),
        (20, 4.0, TypeError, "num_experts=4.0"),
        (20, True, TypeError, "num_experts=True"),
    ],
)
def test_expert_capacity_checks_its_counts(num_pairs, num_experts, error, match):
    with pytest.raises(error, match=match):
        expert_capacity(num_pairs, num_experts, 1.0)


@pytest.mark.parametrize("capacity", [-1, 2.5, True, "2"])
def test_a_capacity_that_is_not_a_slot_count_is_refused(capacity):
    mask = torch.ones(4, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=f"capacity must be an int >= 0.*capacity={capacity!r}"):
        apply_capacity(mask, torch.full((4, 2), 0.5), capacity)


@pytest.mark.parametrize(
    "mask, values, error, words",
    [
        (torch.ones(4, 2), torch.ones(4, 2), TypeError, "mask must be a .* bool tensor"),
        (torch.ones(4, 2, dtype=torch.bool), torch.ones(4, 3), ValueError, r"of shape \(4, 3\)"),
        (
            torch.ones(4, 2, dtype=torch.bool),
            torch.ones(4, 2, dtype=torch.long),
            TypeError,
            "must be a floating-point tensor",
        ),
    ],
)
def test_apply_capacity_and_combine_refuse_mismatched_decisions(mask, values, error, words):
    with pytest.raises(error, match=words.replace("of shape", "probs of shape")):
        apply_capacity(mask, values, 2)
    experts = Experts(num_experts=2, d_model=4, d_hidden=4)
    with pytest.raises(error, match=words.replace("of shape", "weights of shape")):
        combine(torch.randn(4, 4), values, mask, experts)


def test_combine_refuses_inputs_of_other_tokens():
    mask = torch.ones(4, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"x must have shape \(tokens=4, d_model\), .* \(5, 4\)"):
        combine(
            torch.randn(5, 4), mask.float(), mask, Experts(num_experts=2, d_model=4, d_hidden=4)
        )

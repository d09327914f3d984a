"""minimoe.threaded: the experts dealt out to threads on CPU, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minimoe.experts as experts_module
from minimoe import threaded
from minimoe.experts import Experts
from minimoe.threaded import ThreadedExperts, balanced_groups


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def loop_reference(ex: Experts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """One expert at a time through autograd: the formulation the threaded path must equal."""
    outs = [ex.expert(e, xe) for e, xe in enumerate(x.split(counts)) if xe.shape[0]]
    return torch.cat(outs)


def grads(ex: Experts, x: torch.Tensor, out: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    x.grad = ex.gate_up.grad = ex.down.grad = None
    (out * w).sum().backward()
    return [x.grad, ex.gate_up.grad, ex.down.grad]


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_outputs_and_gradients_equal_one_expert_at_a_time(two_threads, activation, groups):
    torch.manual_seed(0)
    ex = Experts(num_experts=6, d_model=16, d_hidden=24, activation=activation).double()
    counts = [5, 0, 17, 3, 9, 1]  # expert 1 gets no rows: zero gradient, not garbage
    x = torch.randn(sum(counts), 16, dtype=torch.double, requires_grad=True)
    w = torch.randn(sum(counts), 16, dtype=torch.double)
    ref = loop_reference(ex, x, counts)
    ref_grads = grads(ex, x, ref, w)
    out = ThreadedExperts.apply(x, ex.gate_up, ex.down, counts, activation, groups)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(ex, x, out, w), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert ex.gate_up.grad[1].abs().max() == 0 and ex.down.grad[1].abs().max() == 0


def test_gradcheck(two_threads):
    torch.manual_seed(1)
    ex = Experts(num_experts=4, d_model=6, d_hidden=5).double()
    counts = [3, 0, 4, 2]
    x = torch.randn(sum(counts), 6, dtype=torch.double, requires_grad=True)
    gate_up = ex.gate_up.detach().requires_grad_(True)
    down = ex.down.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, g, d: ThreadedExperts.apply(x, g, d, counts, "swiglu", 2), (x, gate_up, down)
    )


def test_experts_take_the_threaded_path_with_many_experts_and_several_threads(
    two_threads, monkeypatch
):
    torch.manual_seed(2)
    E = experts_module.CPU_THREADED_MIN_EXPERTS
    ex = Experts(num_experts=E, d_model=16, d_hidden=32)
    counts = [3] * E
    x = torch.randn(sum(counts), 16, requires_grad=True)
    calls = []
    original = ThreadedExperts.apply
    monkeypatch.setattr(ThreadedExperts, "apply", lambda *a: calls.append(1) or original(*a))
    out = ex.grouped(x, counts)
    assert calls == [1]
    torch.testing.assert_close(out, loop_reference(ex, x, counts), rtol=1e-5, atol=1e-6)

    ex.grouped(x, [6] * (E // 2) + [0] * (E - E // 2))  # too few experts with rows
    torch.set_num_threads(1)
    ex.grouped(x, counts)  # one thread: nothing to share
    torch.set_num_threads(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ex.grouped(x, counts)  # autocast: the other paths
    monkeypatch.setattr(experts_module, "openmp_backend", lambda: False)
    ex.grouped(x, counts)  # torch's native thread pool: one thread count for the process
    assert calls == [1]


def test_same_numbers_run_after_run_and_thread_count_restored(two_threads):
    torch.manual_seed(3)
    ex = Experts(num_experts=40, d_model=32, d_hidden=48)
    counts = torch.randint(0, 20, (40,)).tolist()
    x = torch.randn(sum(counts), 32, requires_grad=True)
    w = torch.randn(sum(counts), 32)
    runs = []
    for _ in range(2):
        out = ThreadedExperts.apply(x, ex.gate_up, ex.down, counts, "swiglu", 2)
        assert torch.get_num_threads() == 2
        runs.append([out.detach(), *grads(ex, x, out, w)])
        assert torch.get_num_threads() == 2
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_inference_mode_and_no_grad(two_threads):
    torch.manual_seed(4)
    ex = Experts(num_experts=4, d_model=8, d_hidden=8)
    counts = [2, 3, 0, 5]
    x = torch.randn(10, 8)
    with torch.no_grad():
        ref = loop_reference(ex, x, counts)
    with torch.inference_mode():
        out = ThreadedExperts.apply(x, ex.gate_up, ex.down, counts, "swiglu", 2)
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        out = ThreadedExperts.apply(x, ex.gate_up, ex.down, counts, "swiglu", 2)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref)


def test_a_failing_job_raises_here_and_restores_the_thread_count(two_threads):
    def boom() -> None:
        raise ValueError("job 2 failed")

    ran = []
    with pytest.raises(ValueError, match="job 2 failed"):
        threaded.run_split([lambda: ran.append(torch.get_num_threads()), boom])
    assert ran == [1], "each job runs with one intra-op thread"
    assert torch.get_num_threads() == 2


def test_balanced_groups_by_hand():
    # largest first, each to the lightest group: 9 -> A, 7 -> B, 5 -> B (7 < 9), 3 -> A, 0 left out
    assert balanced_groups([3, 0, 9, 5, 7], 2) == [[0, 2], [3, 4]]
    assert balanced_groups([4, 4], 3) == [[0], [1]]  # no empty group
    assert balanced_groups([0, 0], 2) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=1, max_size=70), st.integers(1, 8))
def test_balanced_groups_cover_every_expert_once_and_are_balanced(counts, n):
    groups = balanced_groups(counts, n)
    assert len(groups) <= n
    flat = sorted(e for g in groups for e in g)
    assert flat == [e for e, c in enumerate(counts) if c]
    rows = [sum(counts[e] for e in g) for g in groups]
    if len(groups) == n:  # greedy largest-first: within one expert of each other
        assert max(rows) - min(rows) <= max(counts)

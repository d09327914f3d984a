"""The expert FFNs against hand-written formulas on the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from minimoe.experts import Experts
from minimoe.threaded import ThreadedExperts, activate

TOL = 1e-10  # float64: only rounding separates the same formula


def _experts(activation: str) -> Experts:
    torch.manual_seed(0)
    experts = Experts(num_experts=3, d_model=8, d_hidden=16, activation=activation).double()
    with torch.no_grad():
        experts.gate_up.mul_(4.0)  # pre-activations of a few units: where GELU's forms differ
    return experts


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_gelu_expert_is_the_exact_erf_gelu_mlp():
    experts = _experts("gelu")
    x = torch.randn(10, 8, dtype=torch.float64)
    counts = [4, 0, 6]
    start = 0
    for e, n in enumerate(counts):
        w_in, w_out = experts.gate_up[e].detach().T, experts.down[e].detach().T  # (d, h), (h, d)
        h = x[start : start + n] @ w_in
        exact = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ w_out
        tanh = (0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))) @ w_out
        if n:
            assert _max_diff(experts.expert(e, x[start : start + n]), exact) < TOL
            assert _max_diff(tanh, exact) > 100 * TOL  # the tolerance tells the two GELUs apart
        start += n
    grouped = experts.grouped(x, counts)
    dense = experts.dense(x)  # (T, E, d) every expert on every token
    assert _max_diff(grouped[:4], dense[:4, 0]) < TOL and _max_diff(grouped[4:], dense[4:, 2]) < TOL


def test_relu_expert_is_switchs_linear_relu_linear():
    experts = _experts("relu")
    x = torch.randn(9, 8, dtype=torch.float64)
    for e in range(experts.num_experts):
        w_in, w_out = experts.gate_up[e].detach().T, experts.down[e].detach().T  # (d, h), (h, d)
        h = x @ w_in
        assert (h < 0).any()  # the clamp is exercised
        assert _max_diff(experts.expert(e, x), h.clamp_min(0) @ w_out) < TOL
    grouped = experts.grouped(x, [3, 0, 6])
    assert _max_diff(grouped[3:], experts.dense(x)[3:, 2]) < TOL


def test_relu_expert_with_biases_is_nllbs_linear_relu_linear():
    """NLLB-MoE's experts: relu(x W1^T + b1) W2^T + b2; the grouped call (one matmul per
    expert with biases) and the layer's two dispatch paths agree with it."""
    torch.manual_seed(0)
    experts = Experts(num_experts=3, d_model=8, d_hidden=16, activation="relu", bias=True).double()
    x = torch.randn(9, 8, dtype=torch.float64)
    for e in range(3):
        w_in, w_out = experts.gate_up[e].detach().T, experts.down[e].detach().T  # (d, h), (h, d)
        b_in, b_out = experts.gate_up_bias[e].detach(), experts.down_bias[e].detach()
        assert b_in.abs().min() > 0  # initialised, as nn.Linear's
        want = (x @ w_in + b_in).clamp_min(0) @ w_out + b_out
        assert _max_diff(experts.expert(e, x), want) < TOL
    grouped = experts.grouped(x, torch.tensor([3, 0, 6]))  # as under torch.compile: the loop
    assert _max_diff(grouped[:3], experts.dense(x)[:3, 0]) < TOL
    assert _max_diff(grouped[3:], experts.dense(x)[3:, 2]) < TOL
    grouped.sum().backward()
    assert experts.down_bias.grad[1].abs().sum() == 0 and experts.down_bias.grad[2].abs().min() > 0
    with pytest.raises(TypeError, match="bias"):
        Experts(num_experts=3, d_model=8, d_hidden=16, bias=1)


def test_swiglu_expert_is_silu_gate_times_up_then_down():
    experts = _experts("swiglu")
    x = torch.randn(7, 8, dtype=torch.float64)
    for e in range(experts.num_experts):
        gate_up = experts.gate_up[e].detach()  # (2h, d): the gate's rows, then the up rows
        w_g, w_u, w_d = gate_up[:16].T, gate_up[16:].T, experts.down[e].detach().T
        g, u = x @ w_g, x @ w_u
        silu = g / (1 + torch.exp(-g))
        by_hand = (silu * u) @ w_d
        assert _max_diff(experts.expert(e, x), by_hand) < TOL
        swapped = ((u / (1 + torch.exp(-u))) * g) @ w_d  # gate and up the other way round
        assert _max_diff(swapped, by_hand) > 100 * TOL
    grouped = experts.grouped(x, [2, 5, 0])
    dense = experts.dense(x)
    assert _max_diff(grouped[:2], dense[:2, 0]) < TOL and _max_diff(grouped[2:], dense[2:, 1]) < TOL


def test_an_expert_split_into_m_finer_ones_is_their_sum():
    # DeepSeekMoE's fine-grained segmentation: the hidden units of one FFN, cut into m slices,
    # are m experts of width h / m whose outputs add up to the FFN's (the activation is per unit)
    m, h = 4, 16
    for activation in ("swiglu", "gelu"):
        coarse = _experts(activation)
        fine = Experts(num_experts=m, d_model=8, d_hidden=h // m, activation=activation).double()
        parts = coarse.gate_up[0].detach().chunk(2 if activation == "swiglu" else 1, dim=0)
        with torch.no_grad():
            for j in range(m):
                units = slice(j * h // m, (j + 1) * h // m)
                fine.gate_up[j] = torch.cat([part[units] for part in parts])  # gate, then up
                fine.down[j] = coarse.down[0, :, units]
        x = torch.randn(5, 8, dtype=torch.float64)
        assert _max_diff(fine.dense(x).sum(dim=1), coarse.expert(0, x)) < TOL
        assert m * fine.flops_per_assignment() == coarse.flops_per_assignment()


# counts that do not describe x's rows: too few, too many, a negative one, one per expert missing
BAD_COUNTS = {
    "sum_short": ([3] * 31 + [2], "counts sum to 95, but x has 96 rows"),
    "sum_long": ([3] * 31 + [4], "counts sum to 97, but x has 96 rows"),
    "negative": ([6, -3] + [3] * 30, r"counts\[1\] must be an int >= 0, got counts\[1\]=-3"),
    "length": ([3] * 31, "counts has 31 entries, expected one per expert \\(32\\)"),
}


@pytest.mark.parametrize("threads", [1, 2])  # 2: the threaded path (32 experts with rows)
@pytest.mark.parametrize("case", BAD_COUNTS)
def test_every_grouped_path_refuses_counts_that_miss_rows(case, threads):
    counts, message = BAD_COUNTS[case]
    ex = Experts(num_experts=32, d_model=16, d_hidden=16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.raises(ValueError, match=message):
            ex.grouped(torch.randn(96, 16), counts)
        if threads == 2 and case != "length":  # the autograd Function itself, called directly
            with pytest.raises(ValueError, match=message):
                ThreadedExperts.apply(torch.randn(96, 16), ex.gate_up, ex.down, counts, "gelu", 2)
    finally:
        torch.set_num_threads(before)


def test_an_unknown_activation_is_refused_not_computed_as_gelu():
    with pytest.raises(ValueError, match="activation must be one of .*, got activation='tanh'"):
        activate(torch.randn(2, 4), "tanh")

"""torch.compile and the MoE layer: minimoe.compiled's experts op, the fixed-shape dispatch, and
every router compiled against eager (outputs, losses, statistics and gradients).

The inductor tests are marked slow: one compiled training step per router on a tiny layer,
and inference where training differs (1-3 s each on a warm cache, 10-20 s on a cold one). Graph counts and the checks
under compilation use ``backend="eager"`` (Dynamo only, no code generation): fast.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from minimoe.compiled import expert_ffn
from minimoe.dispatch import sort_by_expert
from minimoe.experts import Experts
from minimoe.layer import MoE, MoEConfig
from minimoe.routing import (
    Adaptive,
    CapacityTopK,
    ExpertChoice,
    ExpertThreshold,
    GWBroadcast,
    HashTopK,
    NoisyTopK,
    ReMoE,
    Routing,
    ScoreTopK,
    SeqTopK,
    SigmoidTopK,
    SparseMixer,
    TopK,
    TopP,
    top_k,
)
from minimoe.threaded import ThreadedExperts

D, H, E = 8, 16, 4

# every router of the library; "capacity" is top-2 with capacity_factor=1 (drops pairs)
ROUTERS = {
    "top_k": (TopK(k=2), {}),
    "sigmoid_top_k": (SigmoidTopK(k=2, n_group=2, topk_group=1), {}),
    "top_p": (TopP(p=0.4), {}),
    "adaptive": (Adaptive(threshold=0.3), {}),
    "gw": (GWBroadcast(threshold=0.6), {}),
    "noisy_top_k": (NoisyTopK(k=2), {}),
    "expert_choice": (ExpertChoice(capacity_factor=2.0), {}),
    "capacity": (TopK(k=2), {"capacity_factor": 1.0}),
    "remoe": (ReMoE(l1_init=1e-2), {}),
    "expert_threshold": (ExpertThreshold(experts_per_token=1.0, warmup_steps=1), {}),
    "seq_top_k": (SeqTopK(experts_per_token=2, max_experts=3), {}),
}
# the router zoo's rules (minimoe.routing.zoo, capacity, hashing): one compiled inductor step for
# the stateful one, fullgraph on the eager backend for all (hash routing: test below)
ZOO = {
    "zoo logits-softmax": (ScoreTopK(k=2, score="logits", weight="softmax"), {}),
    "zoo sqrt-softplus+bias": (ScoreTopK(k=2, score="sqrt_softplus", selection_bias=True), {}),
    "zoo sigmoid groups": (ScoreTopK(k=2, score="sigmoid", n_group=2, topk_group=1), {}),
    "zoo null experts": (ScoreTopK(k=2, null_experts=2), {}),
    "zoo identity experts": (ScoreTopK(k=2, identity_experts=1), {}),
    "zoo constant experts": (
        ScoreTopK(k=2, null_experts=1, constant_experts=2, renormalize_over="non_null"),
        {},
    ),
    "zoo compute target": (
        ScoreTopK(
            k=2, identity_experts=2, selection_bias=True, bias_rate=0.1, experts_per_token=1.5
        ),
        {},
    ),  # fmt: skip
    "zoo sparse mixer": (SparseMixer(k=2), {}),
    "zoo gemma's normed router": (ScoreTopK(k=2, input_norm=True, expert_scales=True), {}),
    "zoo capacity in the router": (CapacityTopK(k=2), {}),
}
ROUTERS |= ZOO
BREAKS = ("capacity",)  # counts its capacity on the host: int(base.sum())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def layer(name: str, seed: int = 0, **overrides) -> MoE:
    router, settings = ROUTERS[name]
    torch.manual_seed(seed)
    return MoE(
        MoEConfig(d_model=D, d_hidden=H, num_experts=E, router=router, **settings | overrides)
    )


def tokens(seed: int = 1) -> torch.Tensor:
    """(2, 8, D): two sequences, so the per-sequence rules (GW's slot cap) see a layout."""
    return torch.randn(2, 8, D, generator=torch.Generator().manual_seed(seed))


# ---- the experts op -----------------------------------------------------------------------


@pytest.mark.parametrize("min_experts", [1, 99])  # 1: dealt out to threads; 99: one thread
def test_expert_ffn_equals_the_threaded_experts(min_experts):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        ex = Experts(num_experts=5, d_model=6, d_hidden=7).double()
        counts = [3, 0, 4, 2, 1]  # expert 1 gets no rows: zero gradient
        x = torch.randn(10, 6, dtype=torch.double, requires_grad=True)
        w = torch.randn(10, 6, dtype=torch.double)
        ref = ThreadedExperts.apply(x, ex.gate_up, ex.down, counts, "swiglu", 1)
        ref_grads = torch.autograd.grad((ref * w).sum(), (x, ex.gate_up, ex.down))
        counts_t = torch.tensor(counts)
        out, _, _ = expert_ffn(x, ex.gate_up, ex.down, counts_t, "swiglu", min_experts)
        got_grads = torch.autograd.grad((out * w).sum(), (x, ex.gate_up, ex.down))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got_grads[1][1].abs().max() == 0


def test_expert_ffn_registration_passes_opcheck():
    torch.manual_seed(1)
    ex = Experts(num_experts=3, d_model=4, d_hidden=8, activation="gelu")
    x = torch.randn(6, 4, requires_grad=True)
    args = (x, ex.gate_up, ex.down, torch.tensor([2, 0, 4]), "gelu", 99)
    torch.library.opcheck(expert_ffn, args)


@pytest.mark.parametrize("counts", [[2, 2, 1], [3, 4, -1], [0, 0, 0]])
def test_expert_ffn_refuses_counts_that_do_not_cover_the_rows(counts):
    ex = Experts(num_experts=3, d_model=4, d_hidden=4)
    with pytest.raises(ValueError, match="counts must be >= 0 and sum to the 6 rows"):
        expert_ffn(torch.randn(6, 4), ex.gate_up, ex.down, torch.tensor(counts), "swiglu", 99)


def test_expert_ffn_on_no_rows():
    ex = Experts(num_experts=2, d_model=4, d_hidden=4)
    y, _, _ = expert_ffn(torch.randn(0, 4), ex.gate_up, ex.down, torch.tensor([0, 0]), "swiglu", 1)
    assert y.shape == (0, 4)


# ---- the dispatch under compilation -------------------------------------------------------


def test_fixed_shape_pairs_by_hand():
    mask = torch.tensor(
        [[True, False, True], [False, True, True], [True, False, False]]
    )  # token 2 has one expert: with k=2 it gets a filler pair (expert 1, the first it lacks)
    pairs = torch.compile(sort_by_expert, backend="eager", fullgraph=True)(mask, 2)
    assert pairs.expert.tolist() == [0, 0, 1, 1, 2, 2]  # T * k = 6 pairs, expert-major
    assert pairs.token.tolist() == [0, 2, 1, 2, 0, 1]  # token order within an expert
    assert pairs.counts.tolist() == [2, 2, 2]
    eager = sort_by_expert(mask)  # the eager pairs: the same, less the filler
    assert eager.token.tolist() == [0, 2, 1, 0, 1] and eager.counts == [2, 1, 2]


def test_a_router_with_more_than_k_experts_per_token_is_refused_when_compiled():
    class SaysOneSendsTwo:  # a custom router whose k understates its experts per token
        k = 1

        def __call__(self, logits, *, training, seq_len=None) -> Routing:
            return top_k(logits, 2)

    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=E, router=SaysOneSendsTwo()))
    moe(tokens())  # eager: the pairs come from the mask, k is not read
    with pytest.raises(RuntimeError, match="a token has more than k=1 experts"):
        torch.compile(moe, backend="eager", fullgraph=True)(tokens())


def test_nonfinite_logits_are_refused_when_compiled():
    moe = layer("top_k")
    with torch.no_grad():
        moe.gate.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits (must be|are not) finite"):
        moe(tokens())
    with pytest.raises(RuntimeError, match="logits (must be|are not) finite"):
        torch.compile(moe, backend="eager", fullgraph=True)(tokens())


def test_router_state_updated_between_steps_reaches_the_compiled_layer():
    torch.manual_seed(0)
    router = SigmoidTopK(k=1, bias_rate=0.5, renormalize=False)
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=E, router=router))
    compiled = torch.compile(moe, backend="eager", fullgraph=True)
    x = torch.randn(64, D)
    for _ in range(3):
        out = compiled(x)
        assert torch.equal(out.routing.mask, moe(x).routing.mask)
        moe.update_router_state(out.stats)  # b += 0.5 sign(mean load - load): routes move
    assert moe.router_state.bias.abs().sum() > 0


@pytest.mark.parametrize("name", ["remoe", "expert_threshold"])
def test_dynamic_router_state_updated_between_steps_reaches_the_compiled_layer(name):
    """ReMoE's L1 coefficient and the experts' thresholds are read, never baked in."""
    moe = layer(name)
    compiled = torch.compile(moe, backend="eager", fullgraph=True)
    for _ in range(3):
        out, want = compiled(tokens()), moe(tokens())
        assert torch.equal(out.routing.mask, want.routing.mask)
        torch.testing.assert_close(out.aux_loss, want.aux_loss, **CLOSE)
        moe.update_router_state(out.stats)
    state = dict(moe.router_state.named_buffers())
    assert any(v.float().abs().sum() > 0 for v in state.values())


# ---- graph breaks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("top_k", {}),
        ("top_k", {"dispatch": "loop", "activation": "gelu"}),
        ("top_k", {"shared_hidden": 8, "shared_gate": True}),
        ("sigmoid_top_k", {}),
        ("noisy_top_k", {}),
    ],
)
def test_routers_with_k_experts_per_token_compile_as_one_graph(name, overrides):
    """Dropless, k experts per token: one graph even without fullgraph (no data-dependent
    shape, no host sync), in training and inference."""
    moe = layer(name, **overrides)
    counter = CompileCounter()
    compiled = torch.compile(moe, backend=counter)
    compiled(tokens())
    moe.eval()
    with torch.no_grad():
        compiled(tokens())
    assert counter.frame_count == 2  # one graph per mode


@pytest.mark.parametrize("name", [n for n in ROUTERS if n not in BREAKS])
def test_fullgraph_takes_every_dropless_router(name):
    """Variable-k routers too: under fullgraph=True the number of pairs is an unbacked size."""
    torch.compile(layer(name), backend="eager", fullgraph=True)(tokens())


def test_hash_routing_compiles_whole_with_its_token_ids():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=D, d_hidden=H, num_experts=E, router=HashTopK(k=2, vocab_size=32)))
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(moe, backend="eager", fullgraph=True)(tokens(), token_ids=ids)
    torch.testing.assert_close(compiled.output, moe(tokens(), token_ids=ids).output, **CLOSE)


def test_capacity_breaks_the_graph_where_it_counts_on_the_host():
    counter = CompileCounter()
    torch.compile(layer("capacity"), backend=counter)(tokens())
    assert counter.frame_count > 1
    with pytest.raises(Exception, match="data-dependent"):
        torch.compile(layer("capacity"), backend="eager", fullgraph=True)(tokens())


# ---- compiled against eager, with inductor ------------------------------------------------


def step(run, moe: MoE, x: torch.Tensor):
    """One training step of ``moe`` (called as ``run``, compiled or not): the output and the
    gradients of x and of every parameter."""
    x.grad = None
    moe.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same noise draws for noisy top-k, compiled or not
    out = run(x)
    (out.output.square().sum() + out.aux_loss).backward()
    return out, [x.grad, *(p.grad for p in moe.parameters())]


CLOSE = {"rtol": 1e-5, "atol": 1e-6}  # float32 rounding: other kernels, other sum orders


def assert_like_eager(got, want) -> None:
    torch.testing.assert_close(got.output, want.output, **CLOSE)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, **CLOSE)
    torch.testing.assert_close(got.losses, want.losses, **CLOSE)
    assert torch.equal(got.routing.mask, want.routing.mask)
    for field, a, b in zip(got.stats._fields, got.stats, want.stats, strict=True):
        torch.testing.assert_close(a, b, **CLOSE, msg=field)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ROUTERS if n not in ZOO] + ["zoo sqrt-softplus+bias"])
def test_compiled_layer_trains_as_eager(name):
    """One compiled training step per router: fullgraph for every dropless one."""
    moe = layer(name)
    x = tokens().requires_grad_(True)
    compiled = torch.compile(moe, fullgraph=name not in BREAKS)
    with torch._inductor.config.patch(fallback_random=True):  # noisy top-k: eager's draws
        got, got_grads = step(compiled, moe, x)
    want, want_grads = step(moe, moe, x)
    assert_like_eager(got, want)
    for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
        torch.testing.assert_close(a, b, **CLOSE, msg=f"gradient {i}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["top_k", "gw", "noisy_top_k"])  # the last two: training only
def test_compiled_layer_infers_as_eager(name):
    moe = layer(name).eval()
    with torch.no_grad():
        assert_like_eager(torch.compile(moe, fullgraph=True)(tokens()), moe(tokens()))

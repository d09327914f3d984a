"""Routing: from router logits to one decision object.

Every routing method is a small pure function ``logits (T, E) -> Routing`` (or
``Routing -> Routing`` for GW broadcast), and a frozen *router spec* (``TopK(k=2)``,
``TopP(p=0.4)``, ...) that holds the method's settings, checks them once, carries its paper's
loss recipe and is what a layer is configured with. A Routing says, for each token, which
experts it goes to (``mask``) and with which combine weights (``weights``), next to the full
softmax (``probs``) that losses and uncertainty measures need. Dispatch knows nothing of how
the decision was made; this package knows nothing of dispatch.

Files: ``core.py`` (the Routing decision, shared checks, the one rule for ties, uncertainty
measures, the router interface), ``classic.py`` (top-k, noisy top-k, top-p, adaptive, GW
broadcast), ``production.py`` (sigmoid scores with a balancing bias, group-limited selection,
expert choice), ``zoo.py`` (the released models' rules as one composable spec), ``capacity.py``
(capacity inside the router: Switch, NLLB-MoE), ``hashing.py`` (hash routing),
``sparsemixer.py`` (PhiMoE's rounds, sampled in training), ``dynamic.py`` (compute on demand: ReMoE, expert threshold routing, SeqTopK), ``flags.py`` (how a spec's fields
declare their command-line flags), and here the registry of names.

Notation: T tokens, E experts, P = softmax(logits) in float32, S the
set of experts a token is sent to, y = sum_{i in S} g_i * Expert_i(x).

**The router interface.** Any object ``router`` with

    router(logits, *, training: bool, seq_len: int | None = None) -> Routing

is a router: ``MoEConfig(router=router)`` trains it, no library edit needed. ``seq_len`` is
the length of the sequences the T tokens were flattened from (None: one sequence). Optional:

- ``balance_count`` ("first" | "selected") and ``dynamic_coef`` (beta of L_d): how the layer's
  load-balance loss counts and the default weight of the dynamic loss (defaults "first", 0);
- ``router_columns(num_experts) -> int``: router outputs it reads (default E; noisy top-k
  reads E more, the noise logits, which come last and start at zero);
- ``check_experts(num_experts)``: refuse settings that do not fit E (raise ValueError);
- ``uses_token_ids = True``: the router is also called with ``token_ids=`` the (T,) token ids
  given to ``MoE.forward`` (hash routing); routers without it never see them;
- **state not trained by gradient** (a bias, a running count): ``init_state(num_experts)``
  returns named tensors that the layer keeps as buffers (saved with the model, moved with
  it); the router is then called with ``state=`` those buffers, and
  ``update_state(state, stats)`` is called by the training loop after each optimizer step
  with that step's ``MoEStats`` (under expert parallelism their counts are summed over the
  processes first). It is never called inside ``forward``: re-running a cell changes nothing.
- **trained tensors of its own** (Gemma 4's per-expert scales): ``init_params(num_experts,
  d_model)`` returns named tensors that the layer keeps as parameters (``router_params``,
  trained with the router, frozen with it); they come in ``state=`` beside the buffers;
- ``router_input(tokens, state) -> Tensor``: a transform of the (T, d) float32 tokens before the
  router's matmul (Gemma 4 RMS-norms them and multiplies by a learned scale);
- ``input_jitter`` (eps, default 0), ``jitter_experts`` (default True), ``jitter_draws``
  (default 1): in training the layer multiplies its tokens by U(1 - eps, 1 + eps) per element
  (``jittered``, drawn as Hugging Face draws) before the router; with ``jitter_experts`` the
  experts run on the jittered tokens too (Mixtral's, DBRX's, PhiMoE's blocks), else only the
  router reads them (the Switch paper's router jitter);
- ``batch_measure(routing) -> Tensor``: what the router's ``update_state`` needs from the step's
  tokens beyond the counts (expert threshold routing: the logits its cutoffs are read from); the
  layer computes it without gradient and passes it in ``MoEStats.router_measure``. Under expert
  parallelism every rank's measure is averaged, or given in rank order to the router's
  ``merge_measures(parts) -> Tensor``, which returns what one process would have measured;
- ``constant_experts`` (an int): how many constant experts (MoE++) the layer holds and runs on
  the Routing's ``constant`` weights;
- ``balance_weights(num_experts) -> Tensor | None``: eta (C,), one weight per balanced column of
  the layer's balance loss (MoE++'s heterogeneous loss; None: all 1);
- ``aux_losses(routing, state) -> {name: (coefficient, loss)}``: a loss of the router's own
  (ReMoE's L1 penalty, its coefficient from the state): the layer reports ``loss`` unweighted
  in ``losses[name]`` and adds ``coefficient * loss`` to its aux loss.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from minimoe.checks import check_bool, check_choice, check_float, check_int
from minimoe.routing.capacity import CapacityTopK, capacity_top_k
from minimoe.routing.classic import (
    Adaptive,
    GWBroadcast,
    NoisyTopK,
    TopK,
    TopP,
    adaptive,
    gw_broadcast,
    noisy_top_k,
    top_k,
    top_p,
)
from minimoe.routing.core import (
    UNCERTAINTY,
    Router,
    Routing,
    check_experts,
    check_logits,
    check_routing,
    check_threshold,
    entropy,
    first_choice,
    is_uncertain,
    jittered,
    library_router,
    normalized_entropy,
    router_columns,
    top_expert,
    top_gap,
    uncertainty,
    update_state,
)
from minimoe.routing.dynamic import (
    ExpertThreshold,
    ReMoE,
    SeqTopK,
    expert_cutoff,
    expert_threshold,
    relu_l1_loss,
    relu_routing,
    seq_top_k,
)
from minimoe.routing.hashing import HashTopK, hash_top_k
from minimoe.routing.production import (
    ExpertChoice,
    SigmoidTopK,
    expert_choice,
    group_limited,
    sigmoid_top_k,
)
from minimoe.routing.sparsemixer import SparseMixer, sparse_mixer
from minimoe.routing.zoo import ScoreTopK, normed_router_input, score_top_k

__all__ = [
    "ROUTERS",
    "UNCERTAINTY",
    "Adaptive",
    "CapacityTopK",
    "ExpertChoice",
    "ExpertThreshold",
    "GWBroadcast",
    "HashTopK",
    "NoisyTopK",
    "ReMoE",
    "Router",
    "Routing",
    "ScoreTopK",
    "SeqTopK",
    "SigmoidTopK",
    "SparseMixer",
    "TopK",
    "TopP",
    "adaptive",
    "capacity_top_k",
    "check_bool",
    "check_choice",
    "check_experts",
    "check_float",
    "check_int",
    "check_logits",
    "check_routing",
    "library_router",
    "check_threshold",
    "entropy",
    "expert_choice",
    "expert_cutoff",
    "expert_threshold",
    "first_choice",
    "group_limited",
    "gw_broadcast",
    "hash_top_k",
    "is_uncertain",
    "jittered",
    "noisy_top_k",
    "normalized_entropy",
    "normed_router_input",
    "relu_l1_loss",
    "relu_routing",
    "router_columns",
    "router_from_dict",
    "router_from_name",
    "router_to_dict",
    "score_top_k",
    "seq_top_k",
    "sigmoid_top_k",
    "sparse_mixer",
    "top_expert",
    "top_gap",
    "top_k",
    "top_p",
    "uncertainty",
    "update_state",
]


# ---- names: only for the command line, configs on disk and cached results -------------------

ROUTERS: dict[str, type] = {
    cls.name: cls
    for cls in (
        TopK,
        NoisyTopK,
        TopP,
        Adaptive,
        GWBroadcast,
        SigmoidTopK,
        ExpertChoice,
        ScoreTopK,
        CapacityTopK,
        HashTopK,
        SparseMixer,
        ReMoE,
        ExpertThreshold,
        SeqTopK,
    )
}


def router_from_name(name: str, **settings: Any) -> Router:
    """``router_from_name("top_p", p=0.4)`` -> ``TopP(p=0.4)``; unknown names list the choices."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {sorted(ROUTERS)}")
    cls = ROUTERS[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"router {name!r} has no setting {unknown}; its settings: {sorted(known)}")
    return cls(**settings)


def router_to_dict(router: Router) -> dict[str, Any]:
    """A registered spec as plain data: ``{"name": "top_p", "p": 0.4, ...}`` (nested for GW)."""
    cls = type(router)
    if ROUTERS.get(getattr(cls, "name", None)) is not cls:
        raise TypeError(
            f"only the registered routers {sorted(ROUTERS)} can be written as data, "
            f"got {cls.__name__}: keep its code beside the saved weights"
        )
    out: dict[str, Any] = {"name": cls.name}
    for f in fields(router):
        value = getattr(router, f.name)
        out[f.name] = router_to_dict(value) if f.name == "base" else value
    return out


def router_from_dict(data: dict[str, Any]) -> Router:
    """Inverse of ``router_to_dict``."""
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"a router as data is a dict with a 'name', got {data!r}")
    settings = {k: v for k, v in data.items() if k != "name"}
    if "base" in settings:
        settings["base"] = router_from_dict(settings["base"])
    return router_from_name(data["name"], **settings)

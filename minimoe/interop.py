"""Move weights between a minimoe MoE and the sparse MoE blocks of Hugging Face transformers 5.

``from_hf(block)`` reads a block into a MoE; ``to_hf(moe, like=...)`` writes a MoE into a new
block of the family of ``like`` (a block, or the config of the model it goes into).
transformers (>= 5, the ``bench`` extra) is imported only inside the functions. Families:

    family       HF block                router              shared expert of width s
    Mixtral      MixtralSparseMoeBlock   TopK(k)             none
    OLMoE        OlmoeSparseMoeBlock     TopK(k, norm)       none
    Qwen2-MoE    Qwen2MoeSparseMoeBlock  TopK(k, norm)       shared_expert_intermediate_size, gated
    DeepSeek-V3  DeepseekV3MoE           SigmoidTopK(k, ...) h * n_shared_experts, ungated

k = num_experts_per_tok, norm = norm_topk_prob (our ``renormalize``; Mixtral always
renormalizes); DeepSeek-V3: SigmoidTopK(k, n_group, topk_group, norm, routed_scaling_factor).

Weights (every family keeps the routed experts stacked as minimoe does; s the shared width):

    minimoe                  (shape)      Hugging Face
    gate.weight              (E, d)       gate.weight                      router, no bias
    experts.gate_up          (E, 2h, d)   experts.gate_up_proj             rows [:h] gate, [h:] up
    experts.down             (E, d, h)    experts.down_proj
    shared.gate_up[0]        (2s, d)      shared_expert(s).gate_proj; up_proj   (s, d) each
    shared.down[0]           (d, s)       shared_expert(s).down_proj
    shared_gate.weight       (1, d)       shared_expert_gate.weight        Qwen2-MoE
    router_state.bias        (E,)         gate.e_score_correction_bias     DeepSeek-V3
    activation="swiglu"                   hidden_act="silu"

Both sides compute y = sum_{i in S} g_i down_i(silu(gate_i x) * up_i x) (+ the shared expert),
so in float32 the outputs agree to rounding. In lower precision they differ slightly: Mixtral,
OLMoE and Qwen2-MoE take the router matmul in the input dtype (minimoe and DeepSeek-V3 in
float32), and HF multiplies expert outputs by the weights before casting (minimoe casts the
weights to the expert dtype first). A block returns only its output; its routing is
``block.gate(x)``: (logits, top-k weights, top-k expert indices). Mixtral's
``router_jitter_noise`` (training-only input noise) has no minimoe counterpart, so only blocks
without it convert. DeepSeek-V3's bias update rule is not part of the block: ``from_hf`` keeps
SigmoidTopK's default ``bias_rate``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from minimoe.layer import MoE, MoEConfig
from minimoe.routing import SigmoidTopK, TopK

_HINT = "install the bench extra: pip install -e '.[bench]'"
_SILU = ("silu", "swish")  # transformers' names of the activation of SwiGLU


@dataclass(frozen=True)
class _Family:
    """Where one family keeps what minimoe needs (module, class and config field names)."""

    name: str
    module: str  # transformers.models.<module>.modeling_<module>
    block: str
    config: str
    num_experts: str  # config field: routed experts
    width: str  # config field: routed expert width
    shared: str | None = None  # block attribute of the shared expert (an MLP)
    shared_gate: str | None = None  # block attribute of its sigmoid gate
    sigmoid: bool = False  # DeepSeek-V3's biased sigmoid router, else softmax top-k


_MIXTRAL = _Family(
    name="Mixtral",
    module="mixtral",
    block="MixtralSparseMoeBlock",
    config="MixtralConfig",
    num_experts="num_local_experts",
    width="intermediate_size",
)
_FAMILIES = (
    _MIXTRAL,
    _Family(
        name="OLMoE",
        module="olmoe",
        block="OlmoeSparseMoeBlock",
        config="OlmoeConfig",
        num_experts="num_experts",
        width="intermediate_size",
    ),
    _Family(
        name="Qwen2-MoE",
        module="qwen2_moe",
        block="Qwen2MoeSparseMoeBlock",
        config="Qwen2MoeConfig",
        num_experts="num_experts",
        width="moe_intermediate_size",
        shared="shared_expert",
        shared_gate="shared_expert_gate",
    ),
    _Family(
        name="DeepSeek-V3",
        module="deepseek_v3",
        block="DeepseekV3MoE",
        config="DeepseekV3Config",
        num_experts="n_routed_experts",
        width="moe_intermediate_size",
        shared="shared_experts",
        sigmoid=True,
    ),
)


def _classes(family: _Family) -> tuple[type, type]:
    """(config class, block class) of ``family``, or an ImportError naming the bench extra."""
    try:
        import transformers

        module = importlib.import_module(f"transformers.models.{family.module}")
        modeling = importlib.import_module(f"{module.__name__}.modeling_{family.module}")
    except ImportError as err:
        raise ImportError(f"minimoe.interop needs transformers>=5; {_HINT}") from err
    if int(transformers.__version__.split(".")[0]) < 5:  # v4 keeps one nn.Linear per expert
        raise ImportError(
            f"minimoe.interop needs transformers>=5, found {transformers.__version__}; {_HINT}"
        )
    return getattr(transformers, family.config), getattr(modeling, family.block)


def _family_of(obj: object, *, configs: bool = False) -> _Family:
    """The family whose block (or, with ``configs``, config) ``obj`` is; else a TypeError."""
    for family in _FAMILIES:
        config_cls, block_cls = _classes(family)
        if isinstance(obj, block_cls) or (configs and isinstance(obj, config_cls)):
            return family
    kinds = ", ".join(
        f"{f.name} ({f.block}{f' or {f.config}' if configs else ''})" for f in _FAMILIES
    )
    raise TypeError(f"minimoe.interop supports {kinds}; got {type(obj).__name__}")


def _pairs(moe: MoE, block: nn.Module, family: _Family) -> list[tuple[Tensor, Tensor]]:
    """(minimoe tensor, HF tensor) with the same layout, as in the table above (views of both)."""
    pairs = [
        (moe.gate.weight, block.gate.weight),
        (moe.experts.gate_up, block.experts.gate_up_proj),
        (moe.experts.down, block.experts.down_proj),
    ]
    if moe.shared is not None:
        mlp, s = getattr(block, family.shared), moe.config.shared_hidden
        pairs += [
            (moe.shared.gate_up[0, :s], mlp.gate_proj.weight),
            (moe.shared.gate_up[0, s:], mlp.up_proj.weight),
            (moe.shared.down[0], mlp.down_proj.weight),
        ]
    if moe.shared_gate is not None:
        pairs.append((moe.shared_gate.weight, getattr(block, family.shared_gate).weight))
    if family.sigmoid:
        pairs.append((moe.router_state.bias, block.gate.e_score_correction_bias))
    return pairs


def _copy(pairs: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src)


def from_hf(block: nn.Module) -> MoE:
    """A minimoe MoE with the weights and routing of ``block``, on its device, in its dtypes.

    TypeError for a block of another family; ValueError for one minimoe cannot express.
    """
    family = _family_of(block)
    act = block.experts.config.hidden_act
    if act not in _SILU:
        raise ValueError(f"minimoe's swiglu uses silu, the block has hidden_act={act!r}")
    if getattr(block, "jitter_noise", 0):
        raise ValueError(
            f"minimoe has no router jitter; the block has jitter_noise={block.jitter_noise}"
        )
    gate = block.gate
    E = block.experts.gate_up_proj.shape[0]
    if family.sigmoid and gate.num_group > 1 and E // gate.num_group < 2:
        # HF scores a group by its two best experts (topk(2)): its own forward fails on this block
        raise ValueError(
            f"the {family.name} block has n_group={gate.num_group} over {E} experts, fewer than "
            "2 per group: a group is scored by its two best experts, and Hugging Face's own "
            "forward cannot run it (use n_group <= num_experts / 2)"
        )
    if family.sigmoid:
        router = SigmoidTopK(
            k=gate.top_k,
            n_group=gate.num_group,
            topk_group=gate.topk_group,
            renormalize=bool(gate.norm_topk_prob),
            scaling=float(gate.routed_scaling_factor),
        )
    else:  # Mixtral's router has no norm_topk_prob: it always renormalizes
        router = TopK(k=gate.top_k, renormalize=bool(getattr(gate, "norm_topk_prob", True)))
    E, two_h, d = block.experts.gate_up_proj.shape  # (E, 2h, d)
    shared = (
        getattr(block, family.shared).down_proj.weight.shape[1] if family.shared else 0
    )  # (d, s): a width of 0 adds exactly zero, as no shared expert
    config = MoEConfig(
        d_model=d,
        d_hidden=two_h // 2,
        num_experts=E,
        router=router,
        activation="swiglu",
        shared_hidden=shared,
        shared_gate=family.shared_gate is not None and shared > 0,
    )
    w = block.experts.gate_up_proj
    moe = MoE(config).to(device=w.device, dtype=w.dtype)
    moe.gate.to(gate.weight.dtype)
    if family.sigmoid:  # DeepSeek-V3 keeps its router and bias in float32
        moe.router_state.to(gate.e_score_correction_bias.dtype)
    _copy(_pairs(moe, block, family))
    return moe


def _refuse(family: _Family, name: str, value: Any, needs: str) -> ValueError:
    return ValueError(f"{family.name} cannot express {name}={value!r} (it needs {needs})")


def _config_fields(c: MoEConfig, family: _Family) -> dict[str, Any]:
    """The HF config fields that express ``c`` in ``family``; ValueError naming what cannot."""
    if c.activation != "swiglu":
        raise _refuse(family, "activation", c.activation, "activation='swiglu'")
    if c.capacity_factor is not None:
        raise _refuse(family, "capacity_factor", c.capacity_factor, "dropless: None")
    r = c.router
    fields = {
        "hidden_size": c.d_model,
        family.width: c.d_hidden,
        family.num_experts: c.num_experts,
        "hidden_act": "silu",
    }
    if family.sigmoid:
        if type(r) is not SigmoidTopK or r.score != "sigmoid":
            raise _refuse(family, "router", r, "SigmoidTopK(k, score='sigmoid', ...)")
        if c.num_experts // r.n_group < 2:  # HF scores a group by its two best experts
            raise _refuse(family, "n_group", r.n_group, "at least 2 experts per group")
        if c.shared_gate:
            raise _refuse(family, "shared_gate", True, "ungated shared experts: False")
        if c.shared_hidden % c.d_hidden:
            raise _refuse(family, "shared_hidden", c.shared_hidden, "a multiple of d_hidden")
        fields |= {
            "n_group": r.n_group,
            "topk_group": r.topk_group,
            "norm_topk_prob": r.renormalize,
            "routed_scaling_factor": r.scaling,
            "n_shared_experts": c.shared_hidden // c.d_hidden,
        }
    elif type(r) is not TopK:
        raise _refuse(family, "router", r, "TopK(k, renormalize)")
    elif family is _MIXTRAL:
        if not r.renormalize:
            raise _refuse(family, "router", r, "TopK(k, renormalize=True)")
        fields["router_jitter_noise"] = 0.0
    else:
        fields["norm_topk_prob"] = r.renormalize
    if family.shared is None and c.shared_hidden:
        raise _refuse(family, "shared_hidden", c.shared_hidden, "no shared expert: 0")
    if family.shared_gate is not None:
        if not c.shared_gate:  # shared_hidden > 0 follows: MoEConfig checks it
            raise _refuse(family, "shared_gate", c.shared_gate, "a gated shared expert: True")
        fields["shared_expert_intermediate_size"] = c.shared_hidden
    return fields | {"num_experts_per_tok": r.k}


def _to_family(
    moe: MoE, family: _Family, config: Any | None = None, implementation: str = "eager"
) -> nn.Module:
    """A block of ``family`` holding ``moe``, built from ``config`` (None: a new config)."""
    if not isinstance(moe, MoE):
        raise TypeError(f"moe must be a minimoe MoE, got {type(moe).__name__}")
    fields = _config_fields(moe.config, family)
    config_cls, block_cls = _classes(family)
    if config is None:
        config = config_cls(**fields, experts_implementation=implementation)
    elif not isinstance(config, config_cls):
        raise TypeError(f"config must be a {family.config}, got {type(config).__name__}")
    for name, value in fields.items():
        if getattr(config, name) != value:
            raise ValueError(f"config.{name}={getattr(config, name)!r} but the MoE needs {value!r}")
    w = moe.experts.gate_up
    block = block_cls(config).to(device=w.device, dtype=w.dtype)  # uninitialised until _copy
    block.gate.to(moe.gate.weight.dtype)
    if family.sigmoid:  # the bias keeps its own dtype (float32 in DeepSeek-V3 checkpoints)
        block.gate.e_score_correction_bias = torch.empty_like(moe.router_state.bias)
    _copy([(hf, ours) for ours, hf in _pairs(moe, block, family)])
    return block


def to_hf(moe: MoE, like: Any) -> nn.Module:
    """A Hugging Face block with the weights and routing of ``moe``, of the family of ``like``.

    ``like`` a block: only its family (and experts implementation) counts; ``like`` a config:
    the block is built from it, and every field the MoE sets must agree (ValueError naming it).
    ValueError naming the setting when the MoE routes or computes in a way the family cannot.
    """
    family = _family_of(like, configs=True)
    if isinstance(like, _classes(family)[0]):
        return _to_family(moe, family, like)
    return _to_family(
        moe, family, implementation=like.experts.config._experts_implementation or "eager"
    )


def from_mixtral(block: nn.Module) -> MoE:
    """``from_hf`` for a MixtralSparseMoeBlock only."""
    if _family_of(block) is not _MIXTRAL:
        raise TypeError(f"from_mixtral expects a MixtralSparseMoeBlock, got {type(block).__name__}")
    return from_hf(block)


def to_mixtral(moe: MoE, config: Any | None = None) -> nn.Module:
    """``to_hf`` into a MixtralSparseMoeBlock; ``config`` a MixtralConfig or None (a new one)."""
    return _to_family(moe, _MIXTRAL, config)

"""Move weights between a minimoe MoE and the sparse MoE blocks of Hugging Face transformers 5.

``from_hf(block)`` reads a block into a MoE; ``to_hf(moe, like=...)`` writes a MoE into a new
block of the family of ``like`` (a block, the config of the model it goes into, or a family name
of ``minimoe.families``). transformers (the ``bench`` extra pins 5.25.0) is imported only inside
the functions. Which families convert, with which router, and why the others do not: the family
table (``minimoe/families.py``; ``python -m minimoe zoo`` prints it).

Weights (most families keep their routed experts stacked; s the shared width):

    minimoe                  (shape)      Hugging Face
    gate.weight              (E, d)       the family's router weight (gate.weight, router.weight...)
    gate_extra.weight        (m, d)       its last m rows: identity experts (LongCat-Flash)
    experts.gate_up          (E, 2h, d)   experts.gate_up_proj     rows [:h] gate, [h:] up (Aria: T)
    experts.down             (E, d, h)    experts.down_proj                              (Aria: T)
                                          DBRX: experts.mlp.w1, v1 (E h, d) gate, up; w2 (E h, d) = T
                                          Switch: experts.expert_<e>.wi (h, d), wo (d, h): ungated
                                          NLLB-MoE: experts.expert_<e>.fc1 (h, d), fc2 (d, h)
    experts.gate_up_bias     (E, h)       NLLB-MoE: experts.expert_<e>.fc1.bias
    experts.down_bias        (E, d)       NLLB-MoE: experts.expert_<e>.fc2.bias
    shared.gate_up[0]        (2s, d)      <shared>.gate_proj; up_proj   (s, d) each
    shared.down[0]           (d, s)       <shared>.down_proj
    shared_gate.weight       (1, d)       shared_expert_gate.weight        Qwen2-MoE and relatives
    router_state.bias        (E,)         the family's selection bias (e_score_correction_bias...)
    activation="swiglu"                   hidden_act="silu" (DBRX: ffn_act_fn={"name": "silu"})
    activation="relu" or "gelu"           Switch: dense_act_fn, NLLB-MoE: activation_function

Both sides compute y = sum_{i in S} g_i down_i(silu(gate_i x) * up_i x) (+ the shared expert),
so in float32 the outputs agree to rounding. In lower precision they differ slightly: several
families take the router matmul in the input dtype (minimoe in float32), and HF multiplies expert
outputs by the weights before casting (minimoe casts the weights to the expert dtype first).
A block returns only its output; its routing is its router's output. Training-time input jitter
(Mixtral, MiniMax, MiniMax-M2, DBRX, Switch, PhiMoE) is the router's ``input_jitter``: in training
the layer multiplies its tokens by U(1 - eps, 1 + eps) drawn as Hugging Face draws, so under one
seed a converted layer trains as the block does; ``jitter_experts`` says whether the experts see
the jitter, as they do in every such block, except Switch's outside float32 (its router jitters
a float32 copy). Blocks with dropout are refused. DBRX, Switch and NLLB-MoE blocks keep no
config: ``from_hf`` rebuilds one from their modules. Selection-bias update rules are not part of
any block: ``from_hf`` keeps the spec's default ``bias_rate``. NLLB-MoE's block does not follow
its own router (a defect of its experts' code): its conversion follows the router's decision.
"""

from __future__ import annotations

import copy
import functools
import importlib
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from minimoe.families import FAMILIES, MIXTRAL, Family
from minimoe.layer import MoE, MoEConfig

_HINT = "install the bench extra (transformers 5.25.0): pip install -e '.[bench]'"


def _classes(family: Family) -> tuple[type, type]:
    """(config class, block class) of ``family``, or an ImportError naming the bench extra."""
    config_cls, block_cls = _load(family.module, family.config, family.block)
    if config_cls is None or block_cls is None:
        raise ImportError(f"this transformers has no {family.name} ({family.block}); {_HINT}")
    return config_cls, block_cls


@functools.cache
def _load(module: str, config: str, block: str) -> tuple[type | None, type | None]:
    """The classes, or (None, None) when this transformers has no such model (an older one)."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"minimoe.interop needs transformers>=5; {_HINT}") from err
    if int(transformers.__version__.split(".")[0]) < 5:  # v4 keeps one nn.Linear per expert
        raise ImportError(
            f"minimoe.interop needs transformers>=5, found {transformers.__version__}; {_HINT}"
        )
    base = f"transformers.models.{module}"
    try:
        modeling = importlib.import_module(f"{base}.modeling_{module}")
        configuration = importlib.import_module(f"{base}.configuration_{module}")
    except ModuleNotFoundError:
        return None, None
    return getattr(configuration, config, None), getattr(modeling, block, None)


def family_of(obj: object, *, configs: bool = False) -> Family:
    """The family whose block (or config, or name) ``obj`` is; else a TypeError listing them."""
    if isinstance(obj, str):
        for family in FAMILIES:
            if family.name == obj:
                return family
        raise TypeError(f"no family named {obj!r}; the families: {[f.name for f in FAMILIES]}")
    for family in FAMILIES:
        config_cls, block_cls = _load(family.module, family.config, family.block)
        if block_cls is None:
            continue
        if type(obj) is block_cls or (configs and type(obj) is config_cls):
            return family
    kinds = ", ".join(
        f"{f.name} ({f.block}{f' or {f.config}' if configs else ''})" for f in FAMILIES
    )
    raise TypeError(f"minimoe.interop supports {kinds}; got {type(obj).__name__}")


def _get(root: nn.Module, path: str) -> Any:
    for name in filter(None, path.split(".")):
        root = getattr(root, name)
    return root


def _config_of(block: nn.Module, family: Family) -> Any:
    """The config a block was built from (kept by its experts or router module); for blocks that
    keep none (DBRX, Switch), one rebuilt from their modules' settings."""
    from transformers import PretrainedConfig

    if family.module in _REBUILD:
        return _REBUILD[family.module](block, family)
    for module in block.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            return config
    raise ValueError(f"{type(block).__name__} keeps no config: cannot read its router's settings")


def _act_name(module: nn.Module, family: Family) -> str:
    """Hugging Face's name of the activation ``module`` (the family's names first)."""
    from transformers.activations import ACT2FN

    names = [n for n, _ in family.activations] + sorted(ACT2FN)
    for name in names:
        if type(module) is type(ACT2FN[name]):
            return name
    return type(module).__name__


def _dbrx_config(block: nn.Module, family: Family) -> Any:
    experts, mlp = block.experts, block.experts.mlp
    return _classes(family)[0](
        hidden_size=experts.hidden_size,
        ffn_hidden_size=experts.ffn_hidden_size,
        moe_num_experts=experts.num_experts,
        moe_top_k=block.top_k,
        moe_jitter_eps=block.router.moe_jitter_eps,
        moe_normalize_expert_weights=block.moe_normalize_expert_weights,
        ffn_act_fn={"name": _act_name(mlp.activation_fn, family)},
    )


def _switch_config(block: nn.Module, family: Family) -> Any:
    router, first = block.router, block.experts["expert_0"]
    return _classes(family)[0](
        d_model=first.wi.in_features,
        d_ff=first.wi.out_features,
        num_experts=router.num_experts,
        expert_capacity=router.expert_capacity,
        router_jitter_noise=router.jitter_noise,
        router_bias=router.classifier.bias is not None,
        router_dtype=str(router.dtype).removeprefix("torch."),
        router_ignore_padding_tokens=router.ignore_padding_tokens,
        dense_act_fn=_act_name(first.act, family),
        dropout_rate=first.dropout.p,
    )


def _nllb_config(block: nn.Module, family: Family) -> Any:
    router, first = block.router, block.experts["expert_0"]
    return _classes(family)[0](
        d_model=first.fc1.in_features,
        encoder_ffn_dim=first.fc1.out_features,
        decoder_ffn_dim=first.fc1.out_features,
        num_experts=router.num_experts,
        expert_capacity=router.expert_capacity,  # as the router holds it now (see the table)
        router_bias=router.classifier.bias is not None,
        router_dtype=str(router.dtype).removeprefix("torch."),
        router_ignore_padding_tokens=router.router_ignore_padding_tokens,
        second_expert_policy=router.second_expert_policy,
        normalize_router_prob_before_dropping=router.normalize_router_prob_before_dropping,
        batch_prioritized_routing=router.batch_prioritized_routing,
        moe_eval_capacity_token_fraction=router.moe_eval_capacity_token_fraction,
        moe_token_dropout=block.experts.moe_token_dropout,
        activation_function=_act_name(first.act, family),
        activation_dropout=first.dropout.p,
    )


_REBUILD = {"dbrx": _dbrx_config, "switch_transformers": _switch_config, "nllb_moe": _nllb_config}


def _activation(config: Any, family: Family) -> str:
    """minimoe's activation for the block's (ValueError naming the config field otherwise)."""
    if family.act is None:
        return "swiglu"
    name, _, key = family.act.partition(".")
    act = getattr(config, name)
    act = act.get(key) if key and isinstance(act, dict) else act
    ours = dict(family.activations)
    if act not in ours:
        raise ValueError(
            f"minimoe has no counterpart of the block's {family.act}={act!r} (it has {list(ours)})"
        )
    return ours[act]


def _act_fields(family: Family, activation: str) -> dict[str, Any]:
    """The config field that gives minimoe's ``activation`` (ValueError if the family lacks it)."""
    theirs = [hf for hf, ours in family.activations if ours == activation]
    if not theirs:
        kinds = sorted({ours for _, ours in family.activations})
        raise _refuse(family, "activation", activation, f"activation in {kinds}")
    if family.act is None:
        return {}
    name, _, key = family.act.partition(".")
    return {name: {key: theirs[0]} if key else theirs[0]}


def _expert_sizes(block: nn.Module, family: Family) -> tuple[int, int, int, Tensor]:
    """(E, width h, d, one expert weight): sizes, device and dtype of the block's experts."""
    if family.layout == "dbrx":
        ex = block.experts
        return ex.num_experts, ex.ffn_hidden_size, ex.hidden_size, ex.mlp.w1
    if family.layout == "modules":
        wi = getattr(block.experts["expert_0"], family.expert_linears[0]).weight  # (h, d)
        E = sum(name.startswith("expert_") for name in block.experts.keys())  # NLLB: + dropout
        return E, wi.shape[0], wi.shape[1], wi
    w = block.experts.gate_up_proj  # (E, 2h, d); Aria (E, d, 2h)
    E, a, b = w.shape
    return (E, b // 2, a, w) if family.layout == "transposed" else (E, a // 2, b, w)


def _expert_pairs(moe: MoE, block: nn.Module, family: Family) -> list[tuple[Tensor, Tensor]]:
    """(minimoe tensor, HF tensor) pairs of the experts' weights, views of both."""
    gate_up, down, h = moe.experts.gate_up, moe.experts.down, moe.config.d_hidden
    if family.layout == "dbrx":  # rows e*h:(e+1)*h of w1 (gate), v1 (up), w2 (down, transposed)
        mlp, E = block.experts.mlp, moe.config.num_experts
        split = lambda w: w.view(E, h, -1)  # noqa: E731
        return [
            (gate_up[:, :h], split(mlp.w1)),
            (gate_up[:, h:], split(mlp.v1)),
            (down, split(mlp.w2).transpose(1, 2)),
        ]
    if family.layout == "modules":
        ex, first, second = moe.experts, *family.expert_linears
        mlps = [block.experts[f"expert_{e}"] for e in range(moe.config.num_experts)]
        pairs = [(gate_up[e], getattr(m, first).weight) for e, m in enumerate(mlps)]
        pairs += [(down[e], getattr(m, second).weight) for e, m in enumerate(mlps)]
        if ex.gate_up_bias is not None:
            pairs += [(ex.gate_up_bias[e], getattr(m, first).bias) for e, m in enumerate(mlps)]
            pairs += [(ex.down_bias[e], getattr(m, second).bias) for e, m in enumerate(mlps)]
        return pairs
    w, v = block.experts.gate_up_proj, block.experts.down_proj
    if family.layout == "transposed":
        w, v = w.transpose(1, 2), v.transpose(1, 2)
    return [(gate_up, w), (down, v)]


def _shared(block: nn.Module, family: Family) -> nn.Module | None:
    return getattr(block, family.shared, None) if family.shared else None


def _pairs(moe: MoE, block: nn.Module, family: Family) -> list[tuple[Tensor, Tensor]]:
    """(minimoe tensor, HF tensor) with the same layout, as in the table above (views of both)."""
    router, E = _get(block, family.router), moe.config.num_experts
    pairs = [(moe.gate.weight, router[:E]), *_expert_pairs(moe, block, family)]
    if moe.gate_extra is not None:  # LongCat-Flash: the identity experts' rows come last
        pairs.append((moe.gate_extra.weight, router[E:]))
    if moe.shared is not None:
        mlp, s = _shared(block, family), moe.config.shared_hidden
        pairs += [
            (moe.shared.gate_up[0, :s], mlp.gate_proj.weight),
            (moe.shared.gate_up[0, s:], mlp.up_proj.weight),
            (moe.shared.down[0], mlp.down_proj.weight),
        ]
    if moe.shared_gate is not None:
        pairs.append((moe.shared_gate.weight, getattr(block, family.shared_gate).weight))
    if "bias" in dict(moe.router_state.named_buffers()):  # ERNIE keeps it as (1, E)
        pairs.append((moe.router_state.bias, _get(block, family.bias).view(-1)))
    return pairs


def _copy(pairs: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src)


def _refuse_family(family: Family) -> None:
    if not family.converts:
        raise ValueError(f"{family.name} does not convert: {family.refuse}")


def from_hf(block: nn.Module) -> MoE:
    """A minimoe MoE with the weights and routing of ``block``, on its device, in its dtypes.

    TypeError for a block of no family; ValueError for one minimoe cannot express (saying why).
    """
    family = family_of(block)
    _refuse_family(family)
    config = _config_of(block, family)
    activation = _activation(config, family)
    E, h, d, weight = _expert_sizes(block, family)
    router = family.rule.router(config, family.name)
    if family.jitter_at is not None:  # what the block's forward reads, not its config's copy
        router = replace(router, input_jitter=float(_get(block, family.jitter_at)))
    if getattr(router, "input_jitter", 0.0):
        router = replace(router, jitter_experts=_jitter_experts(family, weight.dtype))
    groups = getattr(router, "n_group", 1)
    if groups > 1 and getattr(router, "group_score", "top2_sum") == "top2_sum" and E // groups < 2:
        # HF scores a group by its two best experts (topk(2)): its own forward fails on this block
        raise ValueError(
            f"the {family.name} block has n_group={groups} over {E} experts, fewer than 2 per "
            "group: a group is scored by its two best experts, and Hugging Face's own forward "
            "cannot run it (use n_group <= num_experts / 2)"
        )
    mlp = _shared(block, family)
    shared = 0 if mlp is None else mlp.down_proj.weight.shape[1]  # (d, s); width 0 adds zero
    moe_config = MoEConfig(
        d_model=d,
        d_hidden=h,
        num_experts=E,
        router=router,
        activation=activation,
        shared_hidden=shared,
        shared_gate=family.shared_gate is not None and shared > 0,
        expert_bias=family.expert_bias,
    )
    moe = MoE(moe_config).to(device=weight.device, dtype=weight.dtype)
    moe.gate.to(_get(block, family.router).dtype)
    if moe.gate_extra is not None:
        moe.gate_extra.to(_get(block, family.router).dtype)
    if family.bias is not None and hasattr(moe.router_state, "bias"):
        moe.router_state.to(_get(block, family.bias).dtype)  # e.g. float32 in bf16 checkpoints
    _copy(_pairs(moe, block, family))
    return moe


def _jitter_experts(family: Family, dtype: torch.dtype) -> bool:
    """Whether ``family``'s block in ``dtype`` runs its experts on the jittered tokens: each block
    with jitter multiplies its own input in place (or its router does), except Switch's router,
    which jitters its float32 copy: the block's input itself only when that is float32."""
    return not family.jitter_copy or dtype == torch.float32


def _check_jitter(moe: MoE, family: Family) -> None:
    r, dtype = moe.config.router, moe.experts.gate_up.dtype
    if getattr(r, "input_jitter", 0.0) and r.jitter_experts != _jitter_experts(family, dtype):
        needs = f"jitter_experts={not r.jitter_experts} with {dtype} experts"
        raise _refuse(family, "jitter_experts", r.jitter_experts, needs)


def _refuse(family: Family, name: str, value: Any, needs: str) -> ValueError:
    return ValueError(f"{family.name} cannot express {name}={value!r} (it needs {needs})")


def _shared_fields(c: MoEConfig, family: Family) -> dict[str, Any]:
    """The HF config fields of ``c``'s shared expert in ``family``."""
    s, h = c.shared_hidden, c.d_hidden
    if family.shared is None:
        if s:
            raise _refuse(family, "shared_hidden", s, "no shared expert: 0")
        return {}
    if family.shared_gate is not None and not c.shared_gate:  # shared_hidden > 0 follows
        raise _refuse(family, "shared_gate", c.shared_gate, "a gated shared expert: True")
    if family.shared_gate is None and c.shared_gate:
        raise _refuse(family, "shared_gate", True, "ungated shared experts: False")
    if family.shared_width is None:
        if s % h:
            raise _refuse(family, "shared_hidden", s, "a multiple of d_hidden")
        return {family.shared_count: s // h}
    if family.shared_width == family.width and s != h:  # one field for both widths
        raise _refuse(family, "shared_hidden", s, f"shared_hidden = d_hidden = {h}")
    return {family.shared_width: s} | ({family.shared_count: 1} if family.shared_count else {})


def _config_fields(c: MoEConfig, family: Family) -> dict[str, Any]:
    """The HF config fields that express ``c`` in ``family``; ValueError naming what cannot."""
    if c.capacity_factor is not None:
        raise _refuse(family, "capacity_factor", c.capacity_factor, "dropless: None")
    r = c.router
    fields = family.rule.config_fields(r, family.name)
    grouped = getattr(r, "n_group", 1) > 1 and getattr(r, "group_score", "top2_sum") != "max"
    if grouped and c.num_experts // r.n_group < 2:  # HF scores a group by its two best experts
        raise _refuse(family, "n_group", r.n_group, "at least 2 experts per group")
    if c.expert_bias != family.expert_bias:
        raise _refuse(family, "expert_bias", c.expert_bias, f"expert_bias={family.expert_bias}")
    structure = {"hidden_size": c.d_model, family.num_experts: c.num_experts}
    if family.width_arg is None:  # else the block takes the width as an argument
        structure[family.width] = c.d_hidden
    return structure | _act_fields(family, c.activation) | _shared_fields(c, family) | fields


def _to_family(
    moe: MoE, family: Family, config: Any | None = None, implementation: str = "eager"
) -> nn.Module:
    """A block of ``family`` holding ``moe``, built from ``config`` (None: a new config)."""
    if not isinstance(moe, MoE):
        raise TypeError(f"moe must be a minimoe MoE, got {type(moe).__name__}")
    _refuse_family(family)
    fields = _config_fields(moe.config, family)
    _check_jitter(moe, family)
    config_cls, block_cls = _classes(family)
    if config is None:
        config = config_cls(**fields, experts_implementation=implementation)
    if type(config) is not config_cls:
        raise TypeError(f"config must be a {family.config}, got {type(config).__name__}")
    for name, value in fields.items():
        if getattr(config, name) != value:
            raise ValueError(f"config.{name}={getattr(config, name)!r} but the MoE needs {value!r}")
    w = moe.experts.gate_up
    # DBRX's block takes the model config: its FFN config is the only field it reads
    built = config if family.wrap is None else SimpleNamespace(**{family.wrap: config})
    width = {} if family.width_arg is None else {family.width_arg: moe.config.d_hidden}
    block = block_cls(built, **width).to(device=w.device, dtype=w.dtype)  # set by _copy below
    router_path = family.router.rsplit(".", 1)[0]
    _get(block, router_path).to(moe.gate.weight.dtype)
    if hasattr(moe.router_state, "bias"):  # the bias keeps its own dtype (float32 usually)
        _keep_dtype(block, family.bias, moe.router_state.bias.dtype)
    _copy([(hf, ours) for ours, hf in _pairs(moe, block, family)])
    return block


def _keep_dtype(block: nn.Module, path: str, dtype: torch.dtype) -> None:
    """Give the tensor at ``path`` ``dtype`` in place of the block's (a buffer or a frozen
    parameter: either way it holds the selection bias, which no gradient trains)."""
    *parents, name = path.split(".")
    parent = _get(block, ".".join(parents)) if parents else block
    old = getattr(parent, name)
    if old.dtype != dtype:
        new = old.detach().to(dtype)
        setattr(parent, name, nn.Parameter(new, False) if isinstance(old, nn.Parameter) else new)


def hf_config(moe: MoE, family: str, **extra: Any) -> Any:
    """A new config of ``family`` (a name of ``minimoe.families``) that expresses ``moe``, with
    ``extra`` fields beside (a model's other sizes, which some configs check against d_model)."""
    if not isinstance(moe, MoE):
        raise TypeError(f"moe must be a minimoe MoE, got {type(moe).__name__}")
    found = family_of(family)
    _refuse_family(found)
    fields = _config_fields(moe.config, found)
    return _classes(found)[0](**extra | fields)


def to_hf(moe: MoE, like: Any) -> nn.Module:
    """A Hugging Face block with the weights and routing of ``moe``, of the family of ``like``.

    ``like`` a block: its config with the MoE's settings (sizes, router) in place of its own;
    ``like`` a family name: a new config (``hf_config`` adds other fields); ``like`` a config:
    the block is built from it, and every field the MoE sets must agree (ValueError naming it).
    ValueError naming the setting when the MoE routes or computes in a way the family cannot.
    """
    if not isinstance(moe, MoE):
        raise TypeError(f"moe must be a minimoe MoE, got {type(moe).__name__}")
    family = family_of(like, configs=True)
    if isinstance(like, str):
        return _to_family(moe, family)
    if type(like) is _classes(family)[0]:
        return _to_family(moe, family, like)
    config = copy.deepcopy(
        _config_of(like, family)
    )  # its other settings (experts implementation...)
    for name, value in _config_fields(moe.config, family).items():
        setattr(config, name, value)
    return _to_family(moe, family, config)


def from_mixtral(block: nn.Module) -> MoE:
    """``from_hf`` for a MixtralSparseMoeBlock only."""
    if family_of(block) is not MIXTRAL:
        raise TypeError(f"from_mixtral expects a MixtralSparseMoeBlock, got {type(block).__name__}")
    return from_hf(block)


def to_mixtral(moe: MoE, config: Any | None = None) -> nn.Module:
    """``to_hf`` into a MixtralSparseMoeBlock; ``config`` a MixtralConfig or None (a new one)."""
    return _to_family(moe, MIXTRAL, config)

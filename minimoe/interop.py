"""Move weights between a minimoe MoE and a Hugging Face ``MixtralSparseMoeBlock``.

transformers (>= 5, the ``bench`` extra) is imported only inside the functions. Layouts:

    minimoe                       MixtralSparseMoeBlock (transformers 5)
    gate.weight      (E, d)       gate.weight                (E, d)      router, no bias
    experts.gate_up  (E, 2h, d)   experts.gate_up_proj       (E, 2h, d)  rows [:h] gate, [h:] up
    experts.down     (E, d, h)    experts.down_proj          (E, d, h)
    d_model, d_hidden             hidden_size, intermediate_size
    num_experts, k                num_local_experts, num_experts_per_tok
    activation="swiglu"           hidden_act="silu"
    TopK(k, renormalize=True)     softmax (float32) -> top-k -> divide by the top-k sum

Both compute y = sum_{i in S} g_i down_i(silu(gate_i x) * up_i x), so in float32 the outputs
agree to rounding. In lower precision they differ slightly: HF takes the router matmul in
the input dtype (minimoe in float32) and multiplies expert outputs by float32 weights
(minimoe casts the weights to the expert dtype first). The block returns only the output;
its router logits are ``block.gate(x)[0]``. Mixtral's ``router_jitter_noise`` (training-only
input noise) has no minimoe counterpart, so only blocks without it convert.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minimoe.layer import MoE, MoEConfig
from minimoe.routing import TopK

_HINT = "install the bench extra: pip install -e '.[bench]'"


def _mixtral() -> tuple[Any, Any]:
    """(MixtralConfig, MixtralSparseMoeBlock), or an ImportError naming the bench extra."""
    try:
        import transformers
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as err:
        raise ImportError(f"minimoe.interop needs transformers>=5; {_HINT}") from err
    if int(transformers.__version__.split(".")[0]) < 5:  # v4 keeps one nn.Linear per expert
        raise ImportError(
            f"minimoe.interop needs transformers>=5, found {transformers.__version__}; {_HINT}"
        )
    return MixtralConfig, MixtralSparseMoeBlock


def _pairs(moe: MoE, block: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(minimoe parameter, Mixtral parameter) with the same layout, as in the table above."""
    return [
        (moe.gate.weight, block.gate.weight),
        (moe.experts.gate_up, block.experts.gate_up_proj),
        (moe.experts.down, block.experts.down_proj),
    ]


def _copy(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src)


def from_mixtral(block: nn.Module) -> MoE:
    """A minimoe MoE with the weights of ``block``, on its device, in its dtypes."""
    _, block_cls = _mixtral()
    if not isinstance(block, block_cls):
        raise TypeError(f"from_mixtral expects a MixtralSparseMoeBlock, got {type(block).__name__}")
    hf = block.experts.config
    if hf.hidden_act != "silu":
        raise ValueError(f"minimoe's swiglu uses silu, the block has hidden_act={hf.hidden_act!r}")
    if block.jitter_noise:
        raise ValueError(
            f"minimoe has no router jitter; the block has jitter_noise={block.jitter_noise}"
        )
    E, two_h, d = block.experts.gate_up_proj.shape  # (E, 2h, d)
    config = MoEConfig(
        d_model=d,
        d_hidden=two_h // 2,
        num_experts=E,
        router=TopK(k=block.top_k, renormalize=True),
        activation="swiglu",
    )
    w = block.experts.gate_up_proj
    moe = MoE(config).to(device=w.device, dtype=w.dtype)
    moe.gate.to(block.gate.weight.dtype)
    _copy(_pairs(moe, block))
    return moe


def to_mixtral(moe: MoE, config: Any | None = None) -> nn.Module:
    """A MixtralSparseMoeBlock with the weights of ``moe``; ``config`` a MixtralConfig or None.

    Raises ValueError when the MoE routes or computes in a way Mixtral cannot express.
    """
    c = moe.config
    if type(c.router) is not TopK or not c.router.renormalize:
        raise ValueError(
            f"Mixtral cannot express router={c.router!r} (it needs TopK(k, renormalize=True))"
        )
    for name, value, mixtral in (
        ("activation", c.activation, "swiglu"),
        ("capacity_factor", c.capacity_factor, None),
        ("shared_hidden", c.shared_hidden, 0),  # Mixtral has no shared expert
    ):
        if value != mixtral:
            raise ValueError(
                f"Mixtral cannot express {name}={value!r} (it needs {name}={mixtral!r})"
            )
    config_cls, block_cls = _mixtral()
    fields = {
        "hidden_size": c.d_model,
        "intermediate_size": c.d_hidden,
        "num_local_experts": c.num_experts,
        "num_experts_per_tok": c.router.k,
        "hidden_act": "silu",
        "router_jitter_noise": 0.0,
    }
    if config is None:
        config = config_cls(**fields, experts_implementation="eager")
    for name, value in fields.items():
        if getattr(config, name) != value:
            raise ValueError(f"config.{name}={getattr(config, name)!r} but the MoE needs {value!r}")
    w = moe.experts.gate_up
    block = block_cls(config).to(device=w.device, dtype=w.dtype)  # uninitialised until _copy
    block.gate.to(moe.gate.weight.dtype)
    _copy([(hf, ours) for ours, hf in _pairs(moe, block)])
    return block

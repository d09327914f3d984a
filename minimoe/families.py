"""The MoE families of Hugging Face transformers and their router rules, read from the modeling
files of the version the ``bench`` extra pins (5.25.0); ``minimoe.interop`` converts by this
table and the zoo table (``python -m minimoe zoo``, docs/zoo.md) is generated from it.

A family converts when a minimoe spec expresses its router (``rule``) and its block computes what
a minimoe ``MoE`` computes: SwiGLU (silu) experts without biases (Switch: Linear-ReLU-Linear;
NLLB-MoE: the same with biases), optionally one shared MLP (optionally sigmoid-gated). Otherwise
``refuse`` says why, and ``interop`` raises it. A few rules are checked against the family's
router module although its block does not convert (Gemma 4, gpt-oss, Llama 4, DeepSeek-V4:
tests/test_families.py and tests/test_family_specifics.py). Where a block is wrong, the table
says DEFECT and a test shows it; where its output does not follow its own router
(``follows_router=False``: NLLB-MoE), the conversion follows the router.

Hugging Face's code: routers return raw logits; where a family trains a balance loss
(``POOLED_BALANCE_LOSS``), ``load_balancing_loss_func`` concatenates the logits of *all* layers
before the product f * P (it balances the pooled load, not each layer's), does not divide f by k
(it equals k, not 1, at perfect balance) and takes a softmax of the logits even for sigmoid
routers; no code path updates a selection bias in training; only Switch and NLLB-MoE drop
tokens, and only Switch adds a router z-loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from minimoe.routing import CapacityTopK, Router, ScoreTopK, SigmoidTopK, SparseMixer, TopK

# what a spec type always is, for the table (SigmoidTopK is DeepSeek-V3's rule)
_IMPLIED: dict[type, dict[str, Any]] = {
    TopK: {"score": "softmax", "weight": "score", "selection_bias": False, "n_group": 1},
    SigmoidTopK: {"score": "sigmoid", "weight": "score", "selection_bias": True},
    ScoreTopK: {},
}
_UNTRAINED = (  # not part of the forward rule
    "bias_rate",
    "balance_count",
    "dynamic_coef",
    "experts_per_token",
    "free_balance_weight",
)
# what interop checks against the block's dtype (Switch's router jitters a float32 copy)
_BY_DTYPE = ("jitter_experts",)


@dataclass(frozen=True)
class RouterMap:
    """How a family's config sets its router: ``spec(**constants, **{spec field: config field})``.

    ``requires``: config settings the conversion needs, which ``to_hf`` writes (a falsy one
    also accepts None); ``from_hf`` refuses other values, naming the field.
    """

    spec: type
    fields: dict[str, str]
    constants: dict[str, Any] = field(default_factory=dict)
    requires: dict[str, Any] = field(default_factory=dict)

    def router(self, config: Any, family: str) -> Router:
        for name, value in self.requires.items():
            got = getattr(config, name, value)
            if got != value and (value or got):
                raise ValueError(f"{family} converts only with {name}={value!r}, got {got!r}")
        return self.spec(**self.constants, **self.settings(config))

    def settings(self, config: Any) -> dict[str, Any]:
        """The spec settings ``config`` gives; a field left None keeps the spec's default."""
        values = {spec: getattr(config, cfg) for cfg, spec in self.fields.items()}
        return {spec: value for spec, value in values.items() if value is not None}

    def config_fields(self, router: Router, family: str) -> dict[str, Any]:
        """Config settings that give ``router``; ValueError naming the setting the family lacks."""
        if type(router) is not self.spec:
            raise ValueError(
                f"{family} cannot express router={router!r} (needs {self.spec.__name__})"
            )
        fixed = {f.name for f in fields(router)} - set(self.fields.values()) - set(_UNTRAINED)
        fixed -= set(_BY_DTYPE)
        if not getattr(router, "input_jitter", 0.0):  # how it jitters means nothing without it
            fixed.discard("jitter_draws")
        default = self.spec(**({"k": router.k} | self.constants))  # k: from the config
        for name in sorted(fixed):
            if getattr(router, name) != getattr(default, name):
                raise ValueError(
                    f"{family} cannot express router={router!r} "
                    f"(it needs {name}={getattr(default, name)!r})"
                )
        return {cfg: getattr(router, spec) for cfg, spec in self.fields.items()} | self.requires

    def setting(self, name: str) -> Any:
        """A setting as the table shows it: `config field` (a str in backticks) or a constant."""
        by_field = {spec: cfg for cfg, spec in self.fields.items()}
        if name in by_field:
            return f"`{by_field[name]}`"
        if name in self.constants:
            return self.constants[name]
        return _IMPLIED.get(self.spec, {}).get(name, getattr(self.spec(), name, None))


class DeepSeekV2Map(RouterMap):
    """DeepSeek-V2's ``topk_method``: ``"greedy"`` (no groups) or ``"group_limited_greedy"``."""

    def settings(self, config: Any) -> dict[str, Any]:
        out = super().settings(config)
        if config.topk_method == "greedy":  # n_group and topk_group may be None then
            return out | {"n_group": 1, "topk_group": 1}
        if config.topk_method != "group_limited_greedy":
            raise ValueError(f"DeepSeek-V2 has no topk_method={config.topk_method!r}")
        return out

    def config_fields(self, router: Router, family: str) -> dict[str, Any]:
        out = super().config_fields(router, family)
        grouped = router.n_group > 1
        return out | {"topk_method": "group_limited_greedy" if grouped else "greedy"}


class DbrxMap(RouterMap):
    """DBRX's ``moe_normalize_expert_weights``: p of the p-norm that divides the k weights, or
    None: the weights are the softmax values, undivided. Its ``moe_jitter_eps`` None is no
    jitter (0.0 would draw numbers and multiply by 1)."""

    def settings(self, config: Any) -> dict[str, Any]:
        out = super().settings(config)
        return out | ({"renormalize": False} if config.moe_normalize_expert_weights is None else {})

    def config_fields(self, router: Router, family: str) -> dict[str, Any]:
        jitter = {} if getattr(router, "input_jitter", 0.0) else {"moe_jitter_eps": None}
        if getattr(router, "renormalize", True):
            return super().config_fields(router, family) | jitter
        plain = replace(router, renormalize=True, norm_p=1.0)  # the rest must be DBRX's
        return (
            super().config_fields(plain, family) | {"moe_normalize_expert_weights": None} | jitter
        )


class NllbMap(RouterMap):
    """NLLB-MoE's ``normalize_router_prob_before_dropping``: True is ``normalize="before_drop"``,
    False ``"after_drop"``. With True, ``second_expert_policy="random"`` is refused: Hugging
    Face's router then weighs the second expert by its raw probability and keeps it with
    probability 2 P_2, where it normalizes the first by P_1 + P_2 (fairseq's ``top2gating``, which
    minimoe's spec follows, uses the normalized P_2 for both)."""

    def settings(self, config: Any) -> dict[str, Any]:
        before = config.normalize_router_prob_before_dropping
        if before and config.second_expert_policy == "random":
            raise ValueError(
                "NLLB-MoE converts second_expert_policy='random' only with "
                "normalize_router_prob_before_dropping=False: with True, Hugging Face's router "
                "weighs and keeps the second expert by its raw probability, not the normalized "
                "one it weighs the first by (a defect; fairseq's top2gating uses the normalized)"
            )
        return super().settings(config) | {"normalize": "before_drop" if before else "after_drop"}

    def config_fields(self, router: Router, family: str) -> dict[str, Any]:
        normalize = getattr(router, "normalize", None)
        if normalize not in ("before_drop", "after_drop"):
            raise ValueError(
                f"{family} cannot express router={router!r} (it needs normalize='before_drop' or "
                "'after_drop')"
            )
        if normalize == "before_drop" and router.second_expert == "random":
            raise ValueError(
                f"{family} cannot express second_expert='random' with normalize='before_drop' "
                "(Hugging Face's router weighs the second expert by its raw probability then)"
            )
        out = super().config_fields(replace(router, normalize="after_drop"), family)
        return out | {"normalize_router_prob_before_dropping": normalize == "before_drop"}

    def setting(self, name: str) -> Any:
        if name == "normalize":
            return "`normalize_router_prob_before_dropping`"
        return super().setting(name)


# modeling files of 5.25.0 that define ``load_balancing_loss_func`` (the others train no balance
# loss in Hugging Face's code; Switch and Doge define their own)
POOLED_BALANCE_LOSS = frozenset(
    "dbrx deepseek_v4 ernie4_5_moe ernie4_5_vl_moe flex_olmo flint glm4v_moe glm5_next gpt_oss "
    "granitemoe granitemoe_swa granitemoehybrid granitemoeshared jamba jetmoe laguna lara_mini "
    "mellum minimax minimax_m2 minimax_m3_vl mixtral nllb_moe olmoe phimoe qwen2_moe qwen3_5_moe "
    "qwen3_moe qwen3_next qwen3_omni_moe qwen3_vl_moe qwen4_exp".split()
)


@dataclass(frozen=True)
class Family:
    """One Hugging Face MoE family: its router rule and where its block keeps each weight."""

    name: str
    module: str  # transformers.models.<module>.modeling_<module>
    block: str
    config: str  # a class of transformers.models.<module>.configuration_<module>
    rule: RouterMap | None  # None: no minimoe spec expresses the router
    num_experts: str = "num_experts"  # config fields
    width: str = "moe_intermediate_size"
    router: str = "gate.weight"  # path from the block of the router weight (E, d)
    bias: str | None = None  # path from the block of the selection bias
    # experts: "stacked" (E, 2h, d), (E, d, h); "transposed" (Aria); "dbrx" (rows of w1, v1, w2);
    # "modules" (one Linear-act-Linear module per expert: Switch, NLLB-MoE)
    layout: str = "stacked"
    shared: str | None = None  # block attribute of the shared MLP (gate/up/down_proj)
    shared_count: str | None = None  # config field: shared width = count * width
    shared_width: str | None = None  # config field: the shared width (times count if both)
    shared_gate: str | None = None  # block attribute of the shared expert's sigmoid gate
    act: str | None = "hidden_act"  # None: silu, fixed in the code; "field.key": a dict's key
    # Hugging Face's activation name -> minimoe's (gated experts: silu is SwiGLU)
    activations: tuple[tuple[str, str], ...] = (("silu", "swiglu"), ("swish", "swiglu"))
    wrap: str | None = None  # the block takes a model config holding ``config`` in this field
    # the router jitters a float32 copy of the block's input in place (Switch): the experts see
    # the jitter only when that input is float32 already (else the block jitters its input)
    jitter_copy: bool = False
    jitter_at: str | None = None  # path from the block of the jitter eps its forward reads
    expert_linears: tuple[str, str] = ("wi", "wo")  # layout "modules": each expert's two Linears
    expert_bias: bool = False  # the experts' Linears have biases (NLLB-MoE)
    width_arg: str | None = None  # the block takes the experts' width as this argument
    # the block's output follows its router's decision (False: a DEFECT; minimoe follows the
    # router, and the conformance test computes what a correct block would)
    follows_router: bool = True
    selection: str = ""  # the rule in words where no spec expresses it
    null_experts: str = ""
    trains: str = ""  # beyond the router weight
    notes: str = ""
    refuse: str | None = None  # why interop refuses the block

    @property
    def converts(self) -> bool:
        return self.rule is not None and self.refuse is None


def _like(base: Family, name: str, module: str, block: str, config: str, **changes: Any) -> Family:
    return replace(base, name=name, module=module, block=block, config=config, **changes)


def _topk(
    norm: str | None = "norm_topk_prob", k: str = "num_experts_per_tok", jitter: str | None = None
) -> RouterMap:
    """Softmax, top-k, renormalized as config field ``norm`` says (None: always), with the
    input jitter of config field ``jitter``."""
    fields_ = {k: "k"} | ({norm: "renormalize"} if norm else {})
    return RouterMap(TopK, fields_ | ({jitter: "input_jitter"} if jitter else {}))


def _score(fields_: dict[str, str], k: str = "num_experts_per_tok", **constants) -> RouterMap:
    return RouterMap(ScoreTopK, {k: "k"} | fields_, constants)


_DSV3_FIELDS = {"n_group": "n_group", "topk_group": "topk_group", "norm_topk_prob": "renormalize"}
_DSV3_RULE = RouterMap(
    SigmoidTopK,
    {"num_experts_per_tok": "k", **_DSV3_FIELDS, "routed_scaling_factor": "scaling"},
)
_BIAS_TRAINS = "selection bias: never (no update rule)"
_CLAMPED = "experts: SwiGLU clamped at swiglu_limit, minimoe's swiglu has no clamp"
_GELU_MIX = "experts: interleaved, clamped SwiGLU (alpha 1.702) with biases"
_GEMMA = _score(
    {"rms_norm_eps": "input_norm_eps"}, "top_k_experts", input_norm=True, expert_scales=True
)
_TWO_INPUTS = (
    "router and experts are separate modules of the decoder layer: the router reads the "
    "residual stream, the experts its RMS-normed copy (pre_feedforward_layernorm_2); "
    "experts: GeGLU (gelu_pytorch_tanh); the router is checked alone"
)

MIXTRAL = Family("Mixtral", "mixtral", "MixtralSparseMoeBlock", "MixtralConfig",
                 _topk(None, jitter="router_jitter_noise"), "num_local_experts",
                 "intermediate_size", jitter_at="jitter_noise")  # fmt: skip
OLMOE = _like(MIXTRAL, "OLMoE", "olmoe", "OlmoeSparseMoeBlock", "OlmoeConfig", rule=_topk(),
              num_experts="num_experts", jitter_at=None)  # fmt: skip
QWEN2 = Family("Qwen2-MoE", "qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig", _topk(),
               shared="shared_expert", shared_width="shared_expert_intermediate_size",
               shared_gate="shared_expert_gate")  # fmt: skip
QWEN3 = _like(QWEN2, "Qwen3-MoE", "qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig",
              shared=None, shared_width=None, shared_gate=None)  # fmt: skip
GRANITE = _like(MIXTRAL, "Granite-MoE", "granitemoe", "GraniteMoeMoE", "GraniteMoeConfig",
                rule=_score({}, score="logits", weight="softmax", renormalize=False),
                router="router.weight", jitter_at=None)  # fmt: skip
DSV3 = Family("DeepSeek-V3", "deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config", _DSV3_RULE,
              "n_routed_experts", bias="gate.e_score_correction_bias", shared="shared_experts",
              shared_count="n_shared_experts", trains=_BIAS_TRAINS)  # fmt: skip
DSV2 = _like(DSV3, "DeepSeek-V2", "deepseek_v2", "DeepseekV2Moe", "DeepseekV2Config",
             rule=DeepSeekV2Map(ScoreTopK, {"num_experts_per_tok": "k", "n_group": "n_group",
                                            "topk_group": "topk_group",
                                            "routed_scaling_factor": "scaling"},
                                {"renormalize": False, "group_score": "max"}),
             bias=None, trains="", notes="groups only with topk_method='group_limited_greedy'; "
             "the router ignores the config's norm_topk_prob")  # fmt: skip
MISTRAL4 = _like(DSV3, "Mistral-4", "mistral4", "Mistral4MoE", "Mistral4Config",
                 rule=_score(_DSV3_FIELDS | {"routed_scaling_factor": "scaling"},
                             norm_eps=1e-20), bias=None, trains="")  # fmt: skip
SIGMOID = _score({"norm_topk_prob": "renormalize"}, score="sigmoid")
SIGMOID_BIAS = _score({}, score="sigmoid", selection_bias=True, norm_eps=1e-20)

# fmt: off
FAMILIES: tuple[Family, ...] = (
    # softmax, top-k (renormalized or not)
    MIXTRAL,
    _like(MIXTRAL, "MiniMax", "minimax", "MiniMaxSparseMoeBlock", "MiniMaxConfig"),
    OLMOE,
    _like(OLMOE, "FlexOlmo", "flex_olmo", "FlexOlmoSparseMoeBlock", "FlexOlmoConfig"),
    _like(OLMOE, "Jamba", "jamba", "JambaSparseMoeBlock", "JambaConfig", router="router.weight",
          rule=RouterMap(TopK, {"num_experts_per_tok": "k"}, {"renormalize": False})),
    _like(OLMOE, "HunYuan-MoE-V1", "hunyuan_v1_moe", "HunYuanMoEV1Moe", "HunYuanMoEV1Config",
          rule=_topk(None, k="moe_topk"), router="gate.wg.weight", shared="shared_mlp",
          shared_width="intermediate_size", notes="shared MLP as wide as an expert"),
    QWEN2,
    _like(QWEN2, "Qwen3.5-MoE", "qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock",
          "Qwen3_5MoeTextConfig", rule=_topk(None)),
    _like(QWEN2, "Qwen3-Next", "qwen3_next", "Qwen3NextSparseMoeBlock", "Qwen3NextConfig"),
    _like(QWEN2, "Qwen4-Exp", "qwen4_exp", "Qwen4ExpTextSparseMoeBlock", "Qwen4ExpTextConfig"),
    _like(QWEN2, "Qwen3-Omni talker", "qwen3_omni_moe", "Qwen3OmniMoeTalkerTextSparseMoeBlock",
          "Qwen3OmniMoeTalkerTextConfig"),
    QWEN3,
    _like(QWEN3, "Qwen3-VL-MoE", "qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock",
          "Qwen3VLMoeTextConfig", rule=_topk(None)),
    _like(QWEN3, "Qwen3-Omni thinker", "qwen3_omni_moe",
          "Qwen3OmniMoeThinkerTextSparseMoeBlock", "Qwen3OmniMoeTextConfig"),
    _like(QWEN3, "Mellum", "mellum", "MellumSparseMoeBlock", "MellumConfig"),
    _like(QWEN3, "Lara-mini", "lara_mini", "LaraMiniSparseMoeBlock", "LaraMiniConfig",
          shared="shared_expert", shared_width="shared_expert_intermediate_size"),
    _like(QWEN3, "DBRX", "dbrx", "DbrxFFN", "DbrxFFNConfig",
          rule=DbrxMap(ScoreTopK, {"moe_top_k": "k", "moe_normalize_expert_weights": "norm_p",
                                   "moe_jitter_eps": "input_jitter"}),
          num_experts="moe_num_experts", width="ffn_hidden_size", router="router.layer.weight",
          layout="dbrx", act="ffn_act_fn.name", wrap="ffn_config",
          notes="p unset: undivided; a block is built from a DbrxConfig's ffn_config (to_hf's "
          "like=); DbrxConfig(hidden_size=h) leaves ffn_config.hidden_size at 2048: pass "
          "d_model; a DEFECT: its router jitters the block's input in place, so the experts see "
          "the jitter (megablocks' router jitters a copy)"),
    # softmax with a selection bias
    _like(QWEN3, "ERNIE-4.5-MoE", "ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock",
          "Ernie4_5_MoeConfig", rule=_score({"moe_norm_min": "norm_min"}, selection_bias=True),
          bias="gate.moe_statics.e_score_correction_bias", shared="shared_experts",
          shared_count="moe_num_shared_experts", trains=_BIAS_TRAINS,
          notes="renormalizes by max(sum, moe_norm_min)"),
    _like(QWEN3, "ERNIE-4.5-VL-MoE", "ernie4_5_vl_moe", "Ernie4_5_VLMoeMoeBlock",
          "Ernie4_5_VLMoeTextConfig", rule=_score({"moe_norm_min": "norm_min"}, selection_bias=True),
          bias="text_moe.gate.moe_statics.e_score_correction_bias", trains=_BIAS_TRAINS,
          shared="shared_experts", shared_count="moe_num_shared_experts",
          refuse="two expert sets (text and vision) chosen by token type"),
    _like(QWEN3, "LongCat-Flash", "longcat_flash", "LongcatFlashMoE", "LongcatFlashConfig",
          rule=RouterMap(ScoreTopK, {"num_experts_per_tok": "k",
                                     "routed_scaling_factor": "scaling",
                                     "zero_expert_num": "identity_experts"},
                         {"selection_bias": True, "renormalize": False},
                         {"router_bias": False}),
          num_experts="n_routed_experts", width="expert_ffn_hidden_size",
          router="router.classifier.weight", bias="router.e_score_correction_bias",
          trains=_BIAS_TRAINS),
    _like(QWEN3, "Gemma-4", "gemma4", "Gemma4TextExperts", "Gemma4TextConfig", rule=_GEMMA,
          refuse=_TWO_INPUTS, trains="the router's input scale and per-expert scales"),
    _like(QWEN3, "Diffusion-Gemma", "diffusion_gemma", "DiffusionGemmaTextExperts",
          "DiffusionGemmaTextConfig", rule=_GEMMA, refuse=_TWO_INPUTS,
          trains="the router's input scale and per-expert scales"),
    # top-k of the logits, then a softmax over the k (= renormalized softmax top-k)
    GRANITE,
    _like(GRANITE, "Granite-MoE-SWA", "granitemoe_swa", "GraniteMoeSWAMoE", "GraniteMoeSWAConfig"),
    _like(GRANITE, "Granite-MoE-Shared", "granitemoeshared", "GraniteMoeSharedMoE",
          "GraniteMoeSharedConfig", notes="its shared MLP is in the decoder layer, outside"),
    _like(GRANITE, "Granite-MoE-Hybrid", "granitemoehybrid", "GraniteMoeHybridMoE",
          "GraniteMoeHybridConfig", notes="its shared MLP is in the decoder layer, outside"),
    _like(GRANITE, "Aria", "aria", "AriaTextMoELayer", "AriaTextConfig",
          rule=RouterMap(ScoreTopK, {"moe_topk": "k"}, GRANITE.rule.constants),
          num_experts="moe_num_experts", layout="transposed", shared="shared_experts",
          shared_count="moe_num_shared_experts", width="intermediate_size"),
    _like(GRANITE, "Cohere2-MoE", "cohere2_moe", "Cohere2MoeSparseMoeBlock", "Cohere2MoeConfig",
          rule=RouterMap(ScoreTopK, {"num_experts_per_tok": "k"}, GRANITE.rule.constants,
                         {"expert_selection_fn": "softmax",
                          "shared_expert_combination_strategy": "sum"}),
          num_experts="num_experts", shared="shared_experts", shared_count="num_shared_experts",
          router="gate.weight",
          notes="expert_selection_fn='sigmoid' is ScoreTopK(score='logits', weight='sigmoid')"),
    _like(GRANITE, "JetMoE", "jetmoe", "JetMoeMoE", "JetMoeConfig",
          refuse="an output bias after the experts"),
    _like(GRANITE, "gpt-oss", "gpt_oss", "GptOssMLP", "GptOssConfig",
          refuse=_GELU_MIX + "; the router Linear has a bias", trains="the router's Linear bias"),
    _like(GRANITE, "OpenAI-Privacy-Filter", "openai_privacy_filter", "OpenAIPrivacyFilterMLP",
          "OpenAIPrivacyFilterConfig", refuse=_GELU_MIX + "; the router Linear has a bias",
          trains="the router's Linear bias", notes="weights divided by k"),
    _like(GRANITE, "Doge", "doge", "DogeCDMoE", "DogeConfig", rule=None,
          selection="product keys: top-sqrt(E) of two key halves, top-k of their sums, softmax",
          refuse="rank-one embedding experts beside a dense MLP"),
    _like(GRANITE, "Llama-4", "llama4", "Llama4TextMoe", "Llama4TextConfig",
          rule=_score({}, score="logits", weight="sigmoid", renormalize=False),
          shared="shared_expert", refuse="the routing weight scales the expert's input"),
    # sigmoid scores (DeepSeek-V3's rule and its relatives)
    DSV3,
    _like(DSV3, "DeepSeek-V3.2", "deepseek_v32", "DeepseekV32MoE", "DeepseekV32Config"),
    _like(DSV3, "dots.llm1", "dots1", "Dots1MoE", "Dots1Config"),
    _like(DSV3, "GLM-4-MoE", "glm4_moe", "Glm4MoeMoE", "Glm4MoeConfig"),
    _like(DSV3, "GLM-4-MoE-Lite", "glm4_moe_lite", "Glm4MoeLiteMoE", "Glm4MoeLiteConfig"),
    _like(DSV3, "GLM-4V-MoE", "glm4v_moe", "Glm4vMoeTextMoE", "Glm4vMoeTextConfig"),
    _like(DSV3, "GLM-MoE-DSA", "glm_moe_dsa", "GlmMoeDsaMoE", "GlmMoeDsaConfig"),
    _like(DSV3, "Kimi-Linear", "kimi_linear", "KimiLinearMoE", "KimiLinearConfig",
          num_experts="num_experts"),
    _like(DSV3, "MiniCPM5-MoE", "minicpm5_moe", "MiniCPM5MoeMoE", "MiniCPM5MoeConfig"),
    _like(DSV3, "Solar-Open", "solar_open", "SolarOpenMoE", "SolarOpenConfig"),
    _like(DSV3, "MiMo-V2-Flash", "mimo_v2_flash", "MiMoV2FlashMoE", "MiMoV2FlashConfig",
          shared=None, shared_count=None),
    _like(DSV3, "EXAONE-MoE", "exaone_moe", "ExaoneMoeSparseMoEBlock", "ExaoneMoeConfig",
          num_experts="num_experts", shared_count="num_shared_experts"),
    _like(DSV3, "dots3-note", "dots3_note", "Dots3NoteTextMoE", "Dots3NoteTextConfig",
          shared_width="shared_experts_intermediate_size"),
    _like(DSV3, "Beam", "beam", "BeamMoE", "BeamConfig", num_experts="num_experts", shared=None,
          shared_count=None, notes="routed_scaling_factor scales the summed expert output"),
    _like(DSV3, "AXK1", "axk1", "AXK1MoE", "AXK1Config", refuse="an RMSNorm after the experts"),
    _like(DSV3, "AXK2", "axk2", "AXK2MoE", "AXK2Config", refuse="its groups mask excluded "
          "experts to 0, not -inf: an excluded expert beats a negative biased score"),
    _like(DSV3, "GLM-5-Next", "glm5_next", "Glm5NextTextMoE", "Glm5NextTextConfig",
          refuse=_CLAMPED),
    _like(DSV3, "HY-V4", "hy_v4", "HYV4MoE", "HYV4Config", refuse=_CLAMPED),
    _like(DSV3, "HY-V4-VL", "hy_v4_vl", "HYV4VLMoE", "HYV4VLTextConfig", refuse=_CLAMPED),
    _like(DSV3, "Bailing-Hybrid", "bailing_hybrid", "BailingHybridMoE", "BailingHybridConfig",
          refuse=_CLAMPED),
    _like(DSV3, "Nemotron-H", "nemotron_h", "NemotronHMoE", "NemotronHConfig", shared_count=None,
          shared_width="moe_shared_expert_intermediate_size",
          refuse="experts are not gated (relu^2) and may sit in a latent projection"),
    _like(DSV3, "AFMoE", "afmoe", "AfmoeSparseMoeBlock", "AfmoeConfig",
          rule=replace(SIGMOID_BIAS, fields={"num_experts_per_tok": "k", "route_scale": "scaling"}),
          num_experts="num_experts", router="router.gate.weight", bias="expert_bias",
          shared_count="num_shared_experts"),
    _like(DSV3, "HY-V3", "hy_v3", "HYV3MoE", "HYV3Config", num_experts="num_experts",
          rule=replace(SIGMOID_BIAS, fields={"num_experts_per_tok": "k",
                                             "router_scaling_factor": "scaling"}),
          bias="e_score_correction_bias", shared_count="num_shared_experts"),
    _like(DSV3, "MiniMax-M2", "minimax_m2", "MiniMaxM2SparseMoeBlock", "MiniMaxM2Config",
          rule=replace(SIGMOID_BIAS, constants={"score": "sigmoid", "selection_bias": True},
                       fields={"num_experts_per_tok": "k", "router_jitter_noise": "input_jitter"}),
          jitter_at="jitter_noise",
          num_experts="num_local_experts", width="intermediate_size",
          bias="e_score_correction_bias", shared=None, shared_count=None),
    _like(DSV3, "MiniMax-M3-VL", "minimax_m3_vl", "MiniMaxM3VLSparseMoeBlock",
          "MiniMaxM3VLTextConfig", shared_count=None, shared_width="shared_intermediate_size",
          rule=replace(SIGMOID_BIAS, fields={"num_experts_per_tok": "k",
                                             "routed_scaling_factor": "scaling"}),
          refuse="experts: clamped (up + 1) * gate * sigmoid(alpha * gate), not SwiGLU"),
    _like(DSV3, "Step-3.7", "step3p7", "Step3p7SparseMoeBlock", "Step3p7TextConfig",
          rule=replace(SIGMOID_BIAS, fields={"num_experts_per_tok": "k",
                                             "moe_router_scaling_factor": "scaling"}),
          shared_count=None, shared_width="share_expert_dim", refuse=_CLAMPED),
    _like(DSV3, "Laguna", "laguna", "LagunaSparseMoeBlock", "LagunaConfig",
          rule=_score({"moe_router_logit_softcapping": "softcap",
                       "moe_routed_scaling_factor": "scaling"},
                      score="sigmoid", selection_bias=True),
          num_experts="num_experts", shared_count=None,
          shared_width="shared_expert_intermediate_size",
          notes="logits soft-capped: c tanh(l / c); the scaling multiplies the summed output"),
    _like(DSV3, "LFM2-MoE", "lfm2_moe", "Lfm2MoeSparseMoeBlock", "Lfm2MoeConfig",
          rule=_score({"use_expert_bias": "selection_bias", "norm_topk_prob": "renormalize",
                       "routed_scaling_factor": "scaling"}, score="sigmoid", norm_eps=1e-6),
          num_experts="num_experts", bias="expert_bias", shared=None, shared_count=None, act=None),
    _like(DSV3, "Kolibri-1", "kolibri1", "Kolibri1SparseMoeBlock", "Kolibri1Config",
          rule=_score({"norm_topk_prob": "renormalize"}, score="logits", weight="sigmoid",
                      selection_bias=True),
          num_experts="num_experts", shared_count=None,
          shared_width="shared_expert_intermediate_size",
          notes="the bias is added to the logits; weights are the sigmoid of the chosen"),
    _like(DSV3, "Flint", "flint", "FlintSparseMoeBlock", "FlintConfig", rule=SIGMOID,
          num_experts="num_experts", bias=None, shared="shared_expert", shared_count=None,
          shared_width="shared_expert_intermediate_size", trains=""),
    _like(DSV3, "Ergo", "ergo", "ErgoMoE", "ErgoConfig",
          rule=replace(SIGMOID_BIAS, fields={"num_experts_per_tok": "k",
                                             "moe_routed_scaling_factor": "scaling"}),
          shared_count=None, shared_width="shared_intermediate_size",
          refuse="a learned RMSNorm per expert after each expert"),
    _like(DSV3, "Inkling-2", "inkling2", "Inkling2SparseMoeBlock", "Inkling2TextConfig",
          rule=replace(SIGMOID_BIAS, fields={"num_experts_per_tok": "k",
                                             "routed_scaling_factor": "scaling"}),
          shared=None, refuse="experts: soft-capped SwiGLU",
          notes="score = `scoring_func` (sigmoid by default)"),
    _like(DSV3, "Inkling", "inkling", "InklingMoE", "InklingTextConfig", rule=None,
          selection="sigmoid + bias selects; softmax of log-sigmoid over the chosen and the "
          "shared experts' logits", refuse="the router also weighs the shared experts"),
    _like(DSV3, "Muse-Spark", "muse_spark", "MuseSparkMoE", "MuseSparkTextConfig",
          rule=None, selection="sigmoid of logits times output_multiplier, + bias, renormalized",
          shared=None, refuse="projections and norms around the experts"),
    _like(DSV3, "DeepSeek-V4", "deepseek_v4", "DeepseekV4SparseMoeBlock", "DeepseekV4Config",
          rule=_score({"routed_scaling_factor": "scaling"}, score="sqrt_softplus",
                      selection_bias=True, norm_eps=1e-20),
          shared_count=None, shared_width="intermediate_size",
          refuse=_CLAMPED + "; its first layers hash-route (HashTopK)",
          notes="hash_moe layers: experts = tid2eid[token id] (HashTopK, needs token ids)"),
    # softmax with groups
    MISTRAL4,
    _like(MISTRAL4, "Mistral-Large-4", "mistral_large4", "MistralLarge4TextMoE",
          "MistralLarge4TextConfig",
          rule=_score({"n_group": "n_group", "topk_group": "topk_group",
                       "routed_scaling_factor": "scaling"}, norm_eps=1e-20)),
    DSV2,
    _like(DSV2, "DeepSeek-OCR2", "deepseek_ocr2", "DeepseekOcr2TextMoe", "DeepseekOcr2TextConfig"),
    _like(DSV2, "Unlimited-OCR", "unlimited_ocr", "UnlimitedOcrTextMoe", "UnlimitedOcrTextConfig"),
    # other rules
    _like(MIXTRAL, "PhiMoE", "phimoe", "PhimoeSparseMoeBlock", "PhimoeConfig",
          rule=RouterMap(SparseMixer, {"router_jitter_noise": "jitter_eps",
                                       "input_jitter_noise": "input_jitter"},
                         {"k": 2, "jitter_draws": 2},
                         {"num_experts_per_tok": 2}),  # its code routes two rounds, whatever k
          router="router.weight", trains="Heun's-method gradient for the sampled experts",
          jitter_at="input_jitter_noise",
          notes="in training too, with the same seed the same experts and weights; a DEFECT: "
          "block and router both jitter the input in place (jitter_draws=2): router and experts "
          "see it jittered twice"),
    _like(QWEN3, "Zaya", "zaya", "ZayaSparseMoeBlock", "ZayaConfig", rule=None,
          selection="MLP router with states carried across layers, softmax, + bias, top-k",
          null_experts="1 skip expert (bias -1): weight dropped",
          refuse="its router is an MLP, not a Linear"),
    _like(QWEN3, "Switch", "switch_transformers", "SwitchTransformersSparseMLP",
          "SwitchTransformersConfig",
          rule=RouterMap(CapacityTopK, {"expert_capacity": "expert_capacity",
                                        "router_jitter_noise": "input_jitter"},
                         {"k": 1, "per_sequence": True, "normalize": "none"},
                         {"router_bias": False, "router_dtype": "float32", "dropout_rate": 0.0}),
          width="d_ff", router="router.classifier.weight", layout="modules", act="dense_act_fn",
          activations=(("relu", "relu"), ("gelu", "gelu")),
          trains="capacity drops tokens; a router z-loss",
          jitter_copy=True,
          notes="a DEFECT: its router jitters its float32 copy of the input in place, which in a "
          "float32 block is the block's input: the experts see the jitter too; experts with "
          "dropout are refused; the loss coefficients are the model's, not the block's: "
          "MoEConfig(z_coef=router_z_loss_coef, balance_coef=router_aux_loss_coef)"),
    _like(QWEN3, "NLLB-MoE", "nllb_moe", "NllbMoeSparseMLP", "NllbMoeConfig",
          rule=NllbMap(CapacityTopK, {"expert_capacity": "expert_capacity",
                                      "moe_eval_capacity_token_fraction":
                                      "eval_capacity_fraction",
                                      "second_expert_policy": "second_expert",
                                      "batch_prioritized_routing": "batch_prioritized"}, {"k": 2},
                       {"router_bias": False, "router_dtype": "float32",
                        "moe_token_dropout": 0.0, "activation_dropout": 0.0}),
          router="router.classifier.weight", layout="modules", expert_linears=("fc1", "fc2"),
          expert_bias=True, width_arg="ffn_dim", act="activation_function",
          activations=(("relu", "relu"), ("gelu", "gelu")), follows_router=False,
          trains="capacity drops tokens; no z-loss (its coefficient is read, unused)",
          notes="a DEFECT: its experts one-hot the 0/1 routing mask as if it held expert indices "
          "(expert 1 runs every first choice, expert 0 every other pair), so the block's output "
          "ignores its router: minimoe follows the router; a DEFECT: with second_expert_policy "
          "'sampling' its router adds the Gumbel noise to the logits it returns, in place, so "
          "the balance loss reads noisy logits; a DEFECT: its router stores the evaluation "
          "capacity in expert_capacity, and training keeps it: "
          "from_hf reads the capacity the router holds now; a DEFECT, refused: 'random' with "
          "normalize_router_prob_before_dropping weighs and keeps the second expert by its raw "
          "probability; moe_token_dropout > 0 is refused; padding tokens take no slots in HF's "
          "router, in minimoe's they do"),
)
# fmt: on

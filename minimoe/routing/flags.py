"""The command-line flags of the registered router specs, read from their dataclass fields.

``python -m minimoe train`` (``minimoe.cli``) and ``python -m course`` make a flag of every field
of every spec in ``routing.ROUTERS`` whose type is int, float, bool, str or a Literal (``| None``
allowed: None stays "not given"), so a new router is one class plus its tests. A field says the
rest in ``dataclasses.field(metadata={...})``, every key optional:

- ``"flag"``: the flag's argparse dest where the field's name would be ambiguous (``TopP.p`` ->
  ``"top_p"``, that is ``--top-p``); default: the field's name.
- ``"help"``: what the setting is (the command line adds which routers have it). A flag needs one.
- ``"positive"``: True where a number must be > 0 (an int >= 1); other numbers are >= 0. The
  spec checks the rest (p <= 1, k <= E), and the command line's error names the flag.
- ``"choices"``: the strings a str field takes (a Literal type gives its own).
- ``"no_flag"``: why the field is not a flag (a setting with another home, say).
- ``"base"``: on a field that holds a router, the registered name it is built as, and
  ``"base_flags"`` that router's flags passed on to it (GW-MoE's top-k base takes ``--k``).

A field of another type (a nested router, a tensor) is no flag. Routers that share a flag
(``--k``) share one option: they must agree on its type, range and help (``router_flags``
raises otherwise, naming both fields); their choices are merged, each spec refusing the others'.
The metadata that several routers share is defined once below.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

K = {"help": "experts per token", "positive": True}
RENORMALIZE = {"help": "renormalize the combine weights over the chosen experts"}
SCALING = {"help": "routed scaling factor of the weights", "positive": True}
SCORE = {"help": "score function of the logits"}  # each router adds its "choices"
BIAS_RATE = {"help": "u of the loss-free bias update b_i += u sign(mean load - load_i)"}
N_GROUP = {"help": "expert groups of group-limited selection", "positive": True}
TOPK_GROUP = {"help": "groups a token may choose from", "positive": True}
MAX_EXPERTS = {"help": "a cap on experts per token", "positive": True}
TARGET = {"flag": "target_experts", "help": "target mean experts per token", "positive": True}
BALANCE_COUNT = {"no_flag": "loss recipe: MoEConfig.balance_count overrides it"}
DYNAMIC_COEF = {"no_flag": "loss recipe: the layer's --dynamic-coef overrides it"}
INPUT_JITTER = {
    "help": "eps of the input jitter: in training the layer's tokens times U(1 - eps, 1 + eps) "
    "per element before the router (Mixtral, Switch, DBRX, PhiMoE)"
}
JITTER_EXPERTS = {
    "help": "with input jitter, the experts run on the jittered tokens too (Hugging Face's "
    "blocks); else the router alone reads them"
}

KINDS = (int, float, bool, str)
KEYS = {"flag", "help", "positive", "choices", "no_flag", "base", "base_flags"}
RANGES = {
    (int, True): "an int >= 1",
    (int, False): "an int >= 0",
    (float, True): "a number > 0",
    (float, False): "a number >= 0",
}


@dataclass(frozen=True)
class Setting:
    """One router's field behind a flag: ``field`` is the spec's field (``"base.k"``: its base's
    k), ``default`` its value in the spec built with no arguments."""

    router: str
    field: str
    flag: str  # the argparse dest
    kind: type  # int, float, bool or str
    help: str
    positive: bool = False
    choices: tuple[str, ...] | None = None
    default: Any = None

    @property
    def meaning(self) -> str:
        """What the routers that share the flag must agree on."""
        kind = RANGES.get((self.kind, self.positive), self.kind.__name__)
        choices = " of choices" if self.choices is not None else ""
        return f"{kind}{choices}, help {self.help!r}"


def _kind(hint: Any) -> tuple[type | None, tuple[str, ...] | None]:
    """The flag type of a field's type hint (None: no flag), and a Literal's choices."""
    if get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    if get_origin(hint) is Literal and all(isinstance(a, str) for a in get_args(hint)):
        return str, get_args(hint)
    return (hint if hint in KINDS else None), None


def _settings(name: str, cls: type, routers: Mapping[str, type]) -> list[Setting]:
    """The flags of one spec's fields, the flags passed on to its base included."""
    hints, default = get_type_hints(cls), cls()
    out = []
    for f in fields(cls):
        meta = f.metadata
        unknown = sorted(set(meta) - KEYS)
        if unknown:
            raise TypeError(
                f"{cls.__name__}.{f.name}: unknown metadata {unknown}; keys: {sorted(KEYS)}"
            )
        if "base" in meta:
            base = getattr(default, f.name)
            out += [
                replace(s, router=name, field=f"{f.name}.{s.field}", default=getattr(base, s.field))
                for s in _settings(meta["base"], routers[meta["base"]], routers)
                if s.flag in meta.get("base_flags", ())
            ]
            continue
        kind, choices = _kind(hints[f.name])
        if "no_flag" in meta:
            continue
        if kind is None:
            if meta:
                raise TypeError(
                    f"{cls.__name__}.{f.name}: {sorted(meta)} describe a flag, but its type "
                    f"{hints[f.name]} cannot be one (int, float, bool, str or a Literal)"
                )
            continue
        flag = meta.get("flag", f.name)
        if not meta.get("help"):
            raise TypeError(
                f"{cls.__name__}.{f.name} would be the router flag --{flag.replace('_', '-')} "
                f"of {name!r} but has no help text: give it field(metadata={{'help': ...}}), "
                "or {'no_flag': why} if it is not a flag"
            )
        choices = tuple(meta["choices"]) if "choices" in meta else choices
        positive = bool(meta.get("positive", False))
        value = getattr(default, f.name)
        out.append(Setting(name, f.name, flag, kind, meta["help"], positive, choices, value))
    return out


def router_flags(routers: Mapping[str, type]) -> dict[str, tuple[Setting, ...]]:
    """Every flag of the specs ``routers`` (name -> frozen dataclass) by argparse dest, in the
    order of the routers and their fields: ``{"k": (top_k's k, ...), "top_p": (TopP.p,), ...}``.
    Each spec is built with no arguments once, for its defaults.

    Raises TypeError where two routers would share a flag with another type, range or help, or
    one router would have it twice."""
    flags: dict[str, list[Setting]] = {}
    for name, cls in routers.items():
        for s in _settings(name, cls, routers):
            shared = flags.setdefault(s.flag, [])
            twice = [t.field for t in shared if t.router == name]
            if twice:
                raise TypeError(
                    f"router {name!r} has two fields behind --{s.flag.replace('_', '-')}: "
                    f"{twice[0]} and {s.field}; give one its own flag name"
                )
            if shared and s.meaning != shared[0].meaning:
                first = shared[0]
                raise TypeError(
                    f"router flag --{s.flag.replace('_', '-')} would mean two things: "
                    f"{first.router}'s {first.field} is {first.meaning}; "
                    f"{s.router}'s {s.field} is {s.meaning}. "
                    "Give one of the fields its own flag name: field(metadata={'flag': ...})"
                )
            shared.append(s)
    return {flag: tuple(settings) for flag, settings in flags.items()}

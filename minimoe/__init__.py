"""minimoe: a small, hackable library for Mixture-of-Experts routing.

Read it bottom-up: routing/ (decisions) -> dispatch.py (moving tokens) -> experts.py ->
layer.py (the MoE layer) -> model.py (a tiny transformer) -> train.py.
"""

from minimoe.layer import MoE, MoEConfig, MoEOutput
from minimoe.model import ModelConfig, MoERegressor, TinyTransformer
from minimoe.routing import Routing, adaptive, gw_broadcast, noisy_top_k, top_k, top_p

__version__ = "0.1.0"
__all__ = [
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "ModelConfig",
    "MoERegressor",
    "Routing",
    "TinyTransformer",
    "adaptive",
    "gw_broadcast",
    "noisy_top_k",
    "top_k",
    "top_p",
]

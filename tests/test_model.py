"""The models' boundaries (minimoe/model.py): configs that build nonsense, inputs that make it."""

import math

import pytest
import torch

from minimoe.layer import MoE, MoEConfig, moe_layers
from minimoe.model import ModelConfig, MoERegressor, TinyTransformer


def _lm() -> TinyTransformer:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_hidden=16, num_experts=4)
    return TinyTransformer(ModelConfig(vocab_size=16, block_size=8, n_heads=2, moe=moe))


@pytest.mark.parametrize("n_layers, moe_every", [(2, 3), (1, 2)])
def test_a_config_without_any_moe_layer_is_refused_naming_both_fields(n_layers, moe_every):
    with pytest.raises(ValueError, match=f"moe_every={moe_every} with n_layers={n_layers}"):
        ModelConfig(n_layers=n_layers, moe_every=moe_every)


def test_moe_every_up_to_n_layers_builds_moe_layers():
    assert len(moe_layers(TinyTransformer(ModelConfig(n_layers=3, moe_every=3)))) == 1


def test_targets_all_ignored_are_refused_not_a_nan_loss():
    idx = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"targets are all -100 \(ignored\)"):
        _lm()(idx, targets=torch.full_like(idx, -100))
    targets = torch.full_like(idx, -100)
    targets[0, 0] = 3  # one token scored: a finite loss
    assert math.isfinite(_lm()(idx, targets=targets).loss.item())


def test_targets_of_another_shape_are_refused():
    idx = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"targets must have idx's shape \(2, 4\), got \(8,\)"):
        _lm()(idx, targets=idx.flatten())


@pytest.mark.parametrize("shape", [(6,), (6, 1), (6, 3)])
def test_a_regressor_target_of_the_wrong_width_is_refused(shape):
    model = MoERegressor(4, 2, MoEConfig(d_model=4, d_hidden=8, num_experts=4))
    with pytest.raises(ValueError, match=r"y must have the prediction's shape \(6, 2\)"):
        model(torch.randn(6, 4), torch.randn(*shape))


def test_meta_device_inputs_get_a_clear_error():
    with pytest.raises(ValueError, match="idx is on the meta device"):
        _lm()(torch.zeros(2, 4, dtype=torch.long, device="meta"))
    with torch.device("meta"):
        layer = MoE(MoEConfig(d_model=4, d_hidden=8, num_experts=4))
    with pytest.raises(ValueError, match="MoE input is on the meta device"):
        layer(torch.randn(3, 4, device="meta"))


@pytest.mark.parametrize("bad, words", [(math.inf, "holds inf"), (math.nan, "holds nan")])
def test_non_finite_inputs_are_named_as_they_are(bad, words):
    layer = MoE(MoEConfig(d_model=4, d_hidden=8, num_experts=4))
    x = torch.randn(5, 4)
    x[3, 1] = bad
    with pytest.raises(ValueError, match=f"the MoE input {words} \\(first in row 3\\)"):
        layer(x)

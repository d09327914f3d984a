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


def _padded_batch():
    """idx (2, 6) with 4 and 2 real tokens, then padding (id 0); targets on every position."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(1, 16, (2, 6), generator=g)
    mask = torch.arange(6)[None, :] < torch.tensor([[4], [2]])  # (B, L)
    return idx.masked_fill(~mask, 0), torch.randint(0, 16, (2, 6), generator=g), mask


def test_a_padding_mask_changes_no_real_position_and_scores_no_padding():
    model = _lm().eval()
    idx, targets, mask = _padded_batch()
    out, plain = model(idx, targets, mask=mask), model(idx, targets)
    # causal attention, padding after the end: the real positions compute what they did
    torch.testing.assert_close(out.logits[mask], plain.logits[mask])
    # padding's targets are ignored, and its routing counted nowhere
    expected = model(idx, targets.masked_fill(~mask, -100)).loss
    torch.testing.assert_close(out.loss, expected)
    for layer_out in out.layers:
        assert layer_out.routing.num_tokens == 6
        assert layer_out.stats.tokens_per_expert.sum().item() == 6 * 2  # top-2
    assert out.aux_loss.item() != plain.aux_loss.item()


def test_the_classification_head_averages_the_real_positions():
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_hidden=16, num_experts=4)
    model = TinyTransformer(
        ModelConfig(vocab_size=16, block_size=8, n_heads=2, moe=moe, num_classes=3)
    ).eval()
    idx, _, mask = _padded_batch()
    first = model(idx[:1, :4]).logits  # sequence 0 without its padding
    torch.testing.assert_close(model(idx, mask=mask).logits[:1], first)


def test_a_mask_of_another_shape_is_refused():
    idx, _, mask = _padded_batch()
    with pytest.raises(ValueError, match=r"mask must have idx's shape \(2, 6\), got \(12,\)"):
        _lm()(idx, mask=mask.flatten())

"""The training loop's boundaries (minimoe/train.py): settings and batches it must refuse."""

import pytest
import torch

from minimoe.layer import MoEConfig
from minimoe.model import MoERegressor
from minimoe.train import TrainConfig, mean_loss, train


def _regressor() -> MoERegressor:
    torch.manual_seed(0)
    return MoERegressor(4, 2, MoEConfig(d_model=4, d_hidden=8, num_experts=4))


def _batches(g):
    return {"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, 2, generator=g)}


@pytest.mark.parametrize("field", ["freeze_router", "progress"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_truthy_values_are_not_booleans(field, value):
    with pytest.raises(TypeError, match=f"{field} must be True or False, got {field}="):
        TrainConfig(**{field: value})


def test_a_router_frozen_by_hand_stays_frozen():
    model = _regressor()
    model.moe.gate.weight.requires_grad_(False)
    before = model.moe.gate.weight.clone()
    train(model, _batches, TrainConfig(steps=3, lr=0.1, progress=False))
    assert not model.moe.gate.weight.requires_grad
    assert torch.equal(model.moe.gate.weight, before)


def test_freeze_router_freezes_and_a_later_call_does_not_unfreeze():
    model = _regressor()
    before = model.moe.gate.weight.clone()
    train(model, _batches, TrainConfig(steps=3, lr=0.1, freeze_router=True, progress=False))
    train(model, _batches, TrainConfig(steps=3, lr=0.1, progress=False))
    assert not model.moe.gate.weight.requires_grad
    assert torch.equal(model.moe.gate.weight, before)
    assert not torch.equal(model.moe.experts.down, _regressor().moe.experts.down)  # it trained


def test_mean_loss_of_no_batch_is_refused_not_nan():
    with pytest.raises(ValueError, match="mean_loss got no batches"):
        mean_loss(_regressor(), [])


def test_a_tuple_batch_is_refused_naming_the_dict_expected():
    batch = _batches(torch.Generator())
    x, y = batch["x"], batch["y"]
    with pytest.raises(TypeError, match="get_batch must return a dict .* got tuple"):
        train(_regressor(), lambda g: (x, y), TrainConfig(steps=1, progress=False))
    with pytest.raises(TypeError, match="batches must hold dicts .* got tuple"):
        mean_loss(_regressor(), [(x, y)])


def test_a_step_that_routes_no_token_is_recorded_not_a_crash():
    # ReLU gates that are all negative route nothing: MaxVio of that step is undefined (NaN),
    # the unrouted tokens are counted, and training goes on (ReMoE's lambda can overshoot so)
    from minimoe.routing import ReMoE

    torch.manual_seed(0)
    model = MoERegressor(4, 2, MoEConfig(d_model=4, d_hidden=8, num_experts=4, router=ReMoE()))
    with torch.no_grad():
        model.moe.gate.weight.fill_(-1.0)

    def positive(g):
        return {"x": torch.rand(8, 4, generator=g) + 0.1, "y": torch.randn(8, 2, generator=g)}

    history = train(model, positive, TrainConfig(steps=2, lr=1e-4, progress=False))
    assert all(v != v for row in history.max_violation for v in row)  # NaN, every step
    assert history.experts_per_token == [[0.0], [0.0]]
    out = model(positive(torch.Generator().manual_seed(1))["x"])
    assert out.layers[0].stats.unrouted_tokens.item() == 8

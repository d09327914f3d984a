"""The explorers refuse bad logits when built, not later inside a widget's output."""

import math

import pytest
import torch

from minimoe.widgets import adaptive_explorer, capacity_explorer, top_p_explorer


@pytest.mark.parametrize(
    "logits, error, words",
    [
        ([torch.randn(6)], ValueError, "shape \\(tokens, experts\\)"),
        ([torch.tensor([[0.0, math.nan]])], ValueError, "logits must be finite, found nan"),
        ([torch.zeros(4, 3, dtype=torch.long)], TypeError, "floating point"),
        ([torch.randn(4, 3), torch.randn(5, 3)], ValueError, "one shape"),
        (torch.randn(4, 3), TypeError, "a list of \\(tokens, experts\\) tensors"),
        ([], TypeError, "a list of"),
    ],
)
def test_per_layer_explorers_refuse_bad_logits(logits, error, words):
    for make in (top_p_explorer, adaptive_explorer):
        with pytest.raises(error, match=words):
            make(logits)


def test_groups_of_another_length_and_bad_capacity_logits_are_refused():
    with pytest.raises(ValueError, match="groups must be a \\(4,\\) tensor"):
        top_p_explorer([torch.randn(4, 3)], groups=torch.zeros(5))
    with pytest.raises(ValueError, match="found inf"):
        capacity_explorer(torch.tensor([[0.0, math.inf]]))

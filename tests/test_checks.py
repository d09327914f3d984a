"""The shared input checks (minimoe/checks.py)."""

import math

import pytest
import torch

from minimoe.checks import check_bool, check_float, check_int, require


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_check_float_refuses_what_is_not_finite_even_under_an_open_upper_bound(value):
    with pytest.raises(ValueError, match=r"coef must be a finite number in \[0, inf\]"):
        check_float("coef", value, 0.0)  # high defaults to inf: only isfinite refuses inf


def test_check_float_and_int_bounds():
    assert check_float("p", 1.0, 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_float("p", 0.0, 0.0, 1.0, low_open=True)
    with pytest.raises(TypeError, match="k must be an int, got k=2.0"):
        check_int("k", 2.0, 1)


@pytest.mark.parametrize("value", ["no", 1, None])
def test_check_bool_refuses_truthy_values(value):
    with pytest.raises(TypeError, match="flag must be True or False"):
        check_bool("flag", value)


def test_require_raises_on_cpu_with_its_detail_computed_only_on_failure():
    calls = []
    require(torch.tensor(True), "never", lambda: calls.append(1) or "")
    assert not calls
    with pytest.raises(ValueError, match="x is bad: found nan"):
        require(torch.tensor(False), "x is bad", lambda: "found nan")
    require(torch.tensor(False, device="meta"), "meta tensors have no values")  # nothing to check


@pytest.mark.slow
def test_require_compiles_whole_and_still_refuses():
    def f(x):
        require(torch.isfinite(x).all(), "x must be finite")
        return 2 * x

    compiled = torch.compile(f, fullgraph=True)  # an async assert: no graph break
    assert compiled(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(RuntimeError, match="x must be finite"):
        compiled(torch.tensor([1.0, math.inf]))


def test_only_eager_cpu_values_are_read_on_the_host():
    from minimoe.checks import host_checkable
    from minimoe.routing import check_logits

    assert host_checkable(torch.zeros(()))
    assert not host_checkable(torch.zeros((), device="meta"))
    # meta logits have no values: checked for shape and dtype only, never read
    assert check_logits(torch.empty(4, 3, device="meta")).device.type == "meta"

"""Checks of user input, shared by every module: each returns the value or raises a
TypeError/ValueError that names the parameter and the bad value. Imports nothing of minimoe."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (either bound optional), or a TypeError/ValueError
    naming ``name`` (a bool or a float such as 2.0 is not an int)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {name}={value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        if high is not None:
            bound = f"an int in [{low}, {high}]"
        else:
            bound = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {bound}, got {name}={value!r}")
    return int(value)


def check_float(
    name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False
) -> float:
    """``value`` as a finite float in [low, high] ((low, high] if ``low_open``), else an error naming it."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {name}={value!r}")
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite number in {interval}, got {name}={value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {name}={value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}")
    return value


def require(ok: Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """A check of tensor values that costs no host sync where a sync is dear.

    ``ok`` is a 0-dim bool tensor. Eager on CPU: a ValueError with ``message`` (and ``detail()``,
    computed only on failure) when it is False. On an accelerator, and under ``torch.compile``:
    ``torch._assert_async``, which fails the next synchronizing call with ``message`` instead of
    stopping the host here (and leaves the compiled graph whole). Meta tensors have no values.
    """
    if ok.device.type == "meta":
        return
    if not host_checkable(ok):
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message + (f": {detail()}" if detail is not None else ""))


def host_checkable(t: Tensor) -> bool:
    """Whether reading ``t``'s values here is cheap: eager on the CPU (no device sync, no graph
    break). Elsewhere a check of values is ``require``'s asynchronous assert."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()

"""Shared test setup: one torch thread; tests marked ``@pytest.mark.gpu`` are skipped without CUDA;
fixtures every module may use (``corpus``, ``randn``)."""

import math
from dataclasses import replace

import pytest
import torch

from minimoe.data import byte_corpus

# The test models are tiny: one thread is fastest, and immune to a busy second core
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def corpus():
    """The shipped byte-level text corpus, read once per test session."""
    return byte_corpus()


@pytest.fixture
def randn():
    """``randn(*shape, seed=0, scale=1.0)``: a seeded Gaussian tensor, the global generator untouched."""

    def make(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture
def on_cuda_as_on_cpu():
    """``check(cls, setup, run, measure="loss")``: run ``run`` of the harness experiment ``cls``
    on seed 0 with ``setup`` on the CPU and on CUDA (the device the chapters' live cells pick):
    the same measures, finite, ``measure`` the CPU's up to rounding (routing near-ties may flip a
    few tokens). Returns the GPU's record, for a test's own further checks."""

    def check(cls, setup, run: str, measure: str = "loss") -> dict:
        cpu = cls(setup).run_one(run, 0)
        gpu = cls(replace(setup, device="cuda")).run_one(run, 0)
        assert gpu["measures"].keys() == cpu["measures"].keys()
        assert all(math.isfinite(v) for v in gpu["measures"].values())
        assert gpu["measures"][measure] == pytest.approx(cpu["measures"][measure], rel=0.05)
        return gpu

    return check

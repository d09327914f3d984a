"""Shared test setup: one torch thread; tests marked ``@pytest.mark.gpu`` are skipped without CUDA;
fixtures every module may use (``corpus``, ``randn``)."""

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

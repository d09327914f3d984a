"""Shared test setup: one torch thread; tests marked ``@pytest.mark.gpu`` are skipped without CUDA."""

import pytest
import torch

# The test models are tiny: one thread is fastest, and immune to a busy second core
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

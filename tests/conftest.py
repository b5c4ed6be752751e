"""Shared pytest setup.

TRITON_INTERPRET must be in the environment before anything imports triton (Triton decides at kernel decoration time
whether a kernel is compiled or interpreted), so it is set first: without a GPU the Triton kernels then run on CPU
tensors through the interpreter. setdefault keeps an explicit TRITON_INTERPRET=0, which is how a GPU machine runs the
CUDA tests with a real compile (tests/test_kernels.py also does that in a subprocess).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def cuda_available() -> bool:
    """True when torch sees a CUDA device (tests marked ``gpu`` are skipped otherwise)."""
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test marked ``gpu`` on machines without CUDA, with one clear reason."""
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torch_seed() -> int:
    """Seeds torch's global generator so randomized tests are reproducible; returns the seed."""
    torch.manual_seed(0)
    return 0

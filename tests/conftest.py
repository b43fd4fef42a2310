"""Test set-up: kernels run compiled on CUDA, under Triton's interpreter elsewhere.

TRITON_INTERPRET must be set before any kernel module is imported, so it is decided here,
before the test modules import fastpref."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastpref.kernels import poisoned_outputs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def poison_kernel_outputs():
    """Every kernel output starts as NaN/INT_MIN, so an unwritten value cannot pass."""
    with poisoned_outputs():
        yield

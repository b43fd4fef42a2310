"""Test set-up: kernels run compiled on CUDA, under Triton's interpreter elsewhere.

TRITON_INTERPRET must be set before any kernel module is imported, so it is decided here,
before the test modules import fastpref."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from helpers import KERNELS_RUN_HERE, NO_KERNELS_HERE

from fastpref.kernels import poisoned_outputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    """Where the kernels run here: CUDA when there is a GPU, else the CPU under Triton's
    interpreter; a test that asks for it is skipped on a CPU machine with the interpreter off."""
    if not KERNELS_RUN_HERE:
        pytest.skip(NO_KERNELS_HERE)
    return DEVICE


@pytest.fixture
def no_launch(monkeypatch):
    """Any Triton kernel launch (`kernel[grid](...)` or `kernel.run(..., grid=...)`, compiled or
    interpreted, whichever kernel) fails the test: bad input must be rejected before anything runs."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def launch(self, *args, **kwargs):
        raise AssertionError(f"a kernel was launched before validation: {getattr(self, '__name__', self)}")

    monkeypatch.setattr(JITFunction, "run", launch)
    monkeypatch.setattr(InterpretedFunction, "run", launch)


@pytest.fixture(autouse=True)
def poison_kernel_outputs():
    """Every kernel output starts as NaN/INT_MIN, so an unwritten value cannot pass."""
    with poisoned_outputs():
        yield

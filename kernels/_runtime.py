"""Where and how fastpref kernels run: interpreter default, output allocation, launch geometry.

Import this module before any module that defines a Triton kernel: on a machine without
CUDA it turns on Triton's interpreter (unless ``TRITON_INTERPRET`` is already set), and
``triton.jit`` reads that variable when a kernel is defined.
"""

import contextlib
import functools
import math
import os

import numpy as np
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

import triton.language as tl  # noqa: E402  (after the interpreter decision)

# Programs the row reduction aims to launch per row-set under the interpreter. Small, so
# that CPU tests still split rows across programs without running thousands of them.
INTERPRETER_PROGRAMS = 6


def _torch_empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


_allocate = _torch_empty


def empty(shape, dtype, device):
    """Allocate a kernel output. Tests swap the allocator to poison outputs (see `poisoned_outputs`)."""
    return _allocate(shape, dtype, device)


@contextlib.contextmanager
def poisoned_outputs():
    """Within this block every kernel output starts as NaN (floats) or INT_MIN (ints), so a
    value the kernel forgets to write cannot pass for a correct one."""
    global _allocate

    def poisoned(shape, dtype, device):
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)

    previous, _allocate = _allocate, poisoned
    try:
        yield
    finally:
        _allocate = previous


@functools.cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device):
    """How many programs a row reduction should launch to fill `device`."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROGRAMS


def row_split(rows, n, block, device, max_splits=512):
    """Split each of `rows` rows of `n` elements into chunks (multiples of `block`) so that
    rows * splits programs fill the device. Returns (splits, chunk)."""
    splits = max(1, min(math.ceil(target_programs(device) / rows), math.ceil(n / block), max_splits))
    chunk = math.ceil(math.ceil(n / splits) / block) * block
    return math.ceil(n / chunk), chunk


def next_pow2(x):
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.lru_cache(maxsize=1024)
def f64_pair(x):
    """Split a Python float into two float32 values whose sum is `x` to ~2^-48 relative.

    Triton passes Python floats as fp32; kernels rebuild the value in their accumulation
    dtype (fp64 for fp64 inputs) as hi + lo, so float64 tests see float64 hyperparameters."""
    hi = float(np.float32(x))
    lo = float(np.float32(x - hi))
    return hi, lo


def tl_dtype(torch_dtype):
    """The Triton dtype of an accumulation dtype (float32 or float64)."""
    return _TL_DTYPES[torch_dtype]


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}

"""Where and how fastpref kernels run: interpreter default, output allocation, launch geometry,
how a launch is traced (`launcher`) and the opt-in one-launch forward switch.

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
from torch.library import wrap_triton  # noqa: E402

# Programs the row reduction aims to launch per row-set under the interpreter. Small, so
# that CPU tests still split rows across programs without running thousands of them.
INTERPRETER_PROGRAMS = 6


def _torch_empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


_allocate = _torch_empty


def _torch_empty_like(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_allocate_like = _torch_empty_like


def empty(shape, dtype, device):
    """Allocate a kernel output. Tests swap the allocator to poison outputs (see `poisoned_outputs`)."""
    return _allocate(shape, dtype, device)


def empty_like(x):
    """Allocate a contiguous kernel output of x's shape, dtype and device (as `empty`: poisoned
    inside `poisoned_outputs`; cheaper on the host than `empty` with the shape spelled out)."""
    return _allocate_like(x)


@contextlib.contextmanager
def poisoned_outputs():
    """Within this block every kernel output starts as NaN (floats) or INT_MIN (ints), so a
    value the kernel forgets to write cannot pass for a correct one."""
    global _allocate, _allocate_like

    def poisoned(shape, dtype, device):
        shape = (shape,) if isinstance(shape, int) else shape
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)

    def poisoned_like(x):
        return poisoned(x.shape, x.dtype, x.device)

    previous = _allocate, _allocate_like
    _allocate, _allocate_like = poisoned, poisoned_like
    try:
        yield
    finally:
        _allocate, _allocate_like = previous


@functools.cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device):
    """How many programs a row reduction should launch to fill `device`."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROGRAMS


@functools.lru_cache(maxsize=4096)
def row_split(rows, n, block, device, max_splits=512):
    """Split each of `rows` rows of `n` elements into chunks (multiples of `block`) so that
    rows * splits programs fill the device. Returns (splits, chunk); cached per geometry."""
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


@functools.lru_cache(maxsize=1024)
def float_pairs(values):
    """`f64_pair` of each float of the tuple `values`, as one tuple of pairs (cached per tuple)."""
    return tuple(f64_pair(float(x)) for x in values)


def launcher(kernel, x):
    """`kernel` itself for real tensors (eager, or an operator's kernel: no tracing overhead);
    `torch.library.wrap_triton(kernel)` when `x` is a traced tensor (the CUDA `triton_op`s of
    fastpref/ops.py decomposed by torch.compile, so Inductor sees the launch)."""
    return kernel if type(x) is torch.Tensor else wrap_triton(kernel)


ONE_LAUNCH = os.environ.get("FASTPREF_ONE_LAUNCH", "0") == "1"
"""Opt-in: the forward runs in one launch (kernels/fused.py) instead of row sums + head. Off by
default until the GPU stress test (tests/test_one_launch.py, `run_gpu.sh one-launch`) has passed
on a GPU; set FASTPREF_ONE_LAUNCH=1 or call `set_one_launch(True)`."""


def set_one_launch(enabled):
    """Turn the one-launch forward on or off for later calls (returns the previous setting)."""
    global ONE_LAUNCH
    previous, ONE_LAUNCH = ONE_LAUNCH, bool(enabled)
    return previous


def one_launch():
    return ONE_LAUNCH


_TICKETS = {}


def ticket(device):
    """The one-launch forward's ticket counter on `device`: one int32, zero between launches (the
    program that draws the last ticket resets it). Created on first use, so the first one-launch
    call on a device must not be inside a CUDA-graph capture; calls on one device must not run
    concurrently on different streams (they share the counter)."""
    counter = _TICKETS.get(device)
    if counter is None:
        counter = _TICKETS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def tl_dtype(torch_dtype):
    """The Triton dtype of an accumulation dtype (float32 or float64)."""
    return _TL_DTYPES[torch_dtype]


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}

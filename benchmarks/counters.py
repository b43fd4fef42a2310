"""Device-independent counters: dispatched aten ops, host syncs, Triton launches, live bytes.

These run anywhere (CPU included, where fastpref's Triton kernels run under the
interpreter) and measure properties that do not depend on the device:

* ``OpCounter``: a ``TorchDispatchMode`` counting every aten op dispatched, and the ops that
  read a device value back to the host (``aten._local_scalar_dense``: ``.item()``,
  ``bool(tensor)``, ``if tensor:``; and ops whose output size depends on data, like
  ``nonzero``). Triton kernels are not aten ops: count them with ``triton_launches``.
* ``triton_launches``: patches the Triton launch entry points (compiled and interpreted) and
  counts kernel launches.
* ``peak_extra_bytes``: peak of live allocated bytes above the bytes live before the call,
  from the allocation/free events of ``torch.profiler`` (``profile_memory=True``). On CPU this
  is the host allocator; Triton-interpreter internals (numpy) are not torch allocations and
  are not counted, which matches the GPU, where they live in registers.
"""

from __future__ import annotations

import contextlib
import gc
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# aten ops that force a device->host read (a sync on CUDA) whatever the inputs
SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.equal",
}


def _op_name(func) -> str:
    return f"aten.{func._schema.name.split('::')[-1]}" if hasattr(func, "_schema") else str(func)


class OpCounter(TorchDispatchMode):
    """Count aten ops (``ops``, a Counter by name) and host syncs (``syncs``)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        self.ops[name] += 1
        if name in SYNC_OPS:
            self.syncs += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Total aten ops dispatched."""
        return sum(self.ops.values())


class _LaunchCount:
    def __init__(self):
        self.n = 0
        self.names: Counter = Counter()


@contextlib.contextmanager
def triton_launches():
    """Context manager yielding an object whose ``n`` counts Triton kernel launches.

    Patches ``JITFunction.run`` and the interpreter's ``InterpretedFunction.run`` (the leaf
    launch paths under autotuners and heuristics); warm-up/compile-only calls are excluded.
    """
    count = _LaunchCount()
    patched = []
    try:
        from triton.runtime.jit import JITFunction

        patched.append(JITFunction)
    except ImportError:
        pass
    try:
        from triton.runtime.interpreter import InterpretedFunction

        patched.append(InterpretedFunction)
    except ImportError:
        pass
    originals = {cls: cls.run for cls in patched}

    def make(orig):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
            count.n += 1
            count.names[getattr(self, "__name__", "?")] += 1
            # the launch itself (interpreter bookkeeping included) is not aten work of the
            # caller: hide it from any active OpCounter
            with _disable_current_modes():
                return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

        return run

    for cls in patched:
        cls.run = make(originals[cls])
    try:
        yield count
    finally:
        for cls, orig in originals.items():
            cls.run = orig


def peak_extra_bytes(fn, device: str = "cpu") -> tuple[int, int]:
    """Run ``fn()`` once under the profiler; return (peak extra live bytes, bytes still
    live at the end), both relative to the moment the call starts."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    gc.collect()
    gc.disable()  # no older tensor may be freed inside the window
    try:
        with profile(activities=acts, profile_memory=True) as prof:
            fn()
    finally:
        gc.enable()
    want = torch.device(device).type
    evs = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    evs = [e for e in evs if str(e.device_type()).lower().endswith(want)]
    cur = peak = 0
    for e in sorted(evs, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, cur

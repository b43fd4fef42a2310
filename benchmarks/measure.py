"""Measurements of one provider call on the GPU (with CPU fallbacks for smoke tests).

``make_call`` turns a loss block into a zero-argument call for a mode (``forward``,
``backward``, ``full`` = forward+backward) plus a ``reset`` that drops the gradient between
calls (so no gradient accumulation kernel is timed). Every function here expects the call to
be warmed up already (``warm_up``), so compile/JIT/autotune time is never measured.
"""

from __future__ import annotations

import time
import warnings

import torch

MODES = ["forward", "backward", "full"]


def make_call(block, args, tkw, mode: str):
    """Return ``(call, reset)`` for ``mode``. ``reset`` is untimed set-up run before every
    call: it drops ``model_pred.grad`` (so no accumulation kernel is timed) and, for
    ``backward``, runs the forward whose backward ``call`` then times (no ``retain_graph``,
    which compiled backwards with donated buffers refuse)."""
    x = args[0]
    state = {}

    if mode == "forward":

        def reset():
            x.grad = None

        def call():
            return block(*args, **tkw)
    elif mode == "full":

        def reset():
            x.grad = None

        def call():
            loss, _ = block(*args, **tkw)
            loss.backward()
    elif mode == "backward":

        def reset():
            x.grad = None
            state["loss"] = None
            state["loss"] = block(*args, **tkw)[0]

        def call():
            loss = state.pop("loss")
            loss.backward()
    else:
        raise ValueError(mode)
    return call, reset


def graphed(call, reset, warmup: int = 3):
    """Capture ``call`` (after ``reset``) once in a CUDA graph; return ``(replay, no-op reset)``.

    Warm-up runs on a side stream, as PyTorch's graph docs ask. Replays reuse the captured
    buffers (the gradient is rewritten in place), so nothing is reset between them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            reset()
            call()
    torch.cuda.current_stream().wait_stream(stream)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay, (lambda: None)


def sync(device: str) -> None:
    """Wait for the device (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def warm_up(call, reset, device: str, n: int = 3) -> None:
    """Run the call ``n`` times (compiles, autotunes, records CUDA graphs) and wait."""
    for _ in range(n):
        reset()
        call()
    sync(device)


def time_quantiles_ms(
    call, reset, device: str, rep_ms: int = 25, warmup_ms: int = 5, cpu_reps: int = 5, max_reps: int = 200
) -> tuple[float, float, float]:
    """(p20, p50, p80) of one call in ms.

    CUDA: CUDA events around each call, as ``triton.testing.do_bench`` does (same
    estimate / warm-up / repeat scheme, L2 flushed before every call), but with the untimed
    ``reset`` before each call so backward-only can be timed without ``retain_graph``.
    CPU: a wall-clock loop (smoke tests only: interpreter timings mean nothing).
    """
    if device != "cuda":
        ts = []
        for _ in range(cpu_reps):
            reset()
            t0 = time.perf_counter()
            call()
            ts.append((time.perf_counter() - t0) * 1e3)
        return _quantiles(ts)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def timed(n):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            reset()
            flush.zero_()
            starts[i].record()
            call()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]

    est = _quantiles(timed(5))[1]
    n_warm = max(1, int(warmup_ms / max(est, 1e-3)))
    n_rep = min(max_reps, max(10, int(rep_ms / max(est, 1e-3))))
    for _ in range(n_warm):
        reset()
        call()
    return _quantiles(timed(n_rep))


def _quantiles(ts) -> tuple[float, float, float]:
    t = torch.tensor(ts, dtype=torch.float64)
    return tuple(float(torch.quantile(t, q)) for q in (0.2, 0.5, 0.8))


def peak_extra_bytes(call, reset, device: str) -> int:
    """Peak allocated bytes above what was allocated just before the call (inputs, and for
    ``backward`` the saved forward state). CUDA: ``max_memory_allocated`` after a reset."""
    reset()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    import counters

    return counters.peak_extra_bytes(call)[0]


# host-side CUDA runtime/driver calls that put work on the GPU
HOST_LAUNCH_CALLS = {
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
    "cudaMemsetAsync",
    "cudaMemcpyAsync",
    "cudaLaunchCooperativeKernel",
}


def _gpu_activities(fn, n: int) -> tuple[int, int]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    evs = prof.profiler.kineto_results.events()
    gpu = sum(1 for e in evs if e.device_type() == DeviceType.CUDA)
    host = sum(1 for e in evs if e.device_type() == DeviceType.CPU and e.name() in HOST_LAUNCH_CALLS)
    return gpu, host


def cuda_kernels_per_call(call, reset, n: int = 3) -> tuple[float, float]:
    """(GPU activities, host launch calls) per call, counted with ``torch.profiler``.

    GPU activities are kernels, memsets and memcpys as the GPU ran them (kernels inside a
    replayed CUDA graph included); host launch calls are the runtime calls that enqueue
    them (one ``cudaGraphLaunch`` for a whole graph). Both are (set-up + call) minus set-up
    alone, so the forward run by ``backward``'s set-up is not counted."""

    def both():
        reset()
        call()

    g_total, h_total = _gpu_activities(both, n)
    g_setup, h_setup = _gpu_activities(reset, n)
    return (g_total - g_setup) / n, (h_total - h_setup) / n


def cuda_host_syncs_per_call(call, reset) -> int:
    """Host<->device synchronisations in one call, from ``torch.cuda.set_sync_debug_mode``
    warnings (item(), bool(tensor), nonzero, blocking copies, ...)."""
    reset()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # Only the sync-debug-mode warnings count: other warnings may mention synchronisation
    # (autograd's AccumulateGrad stream warning says "unnecessary synchronization").
    return sum("called a synchronizing cuda operation" in str(w.message).lower() for w in caught)


def device_copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth in GB/s (1e9 B/s) from a large device-to-device copy:
    bytes read + bytes written over the median time."""
    import triton.testing

    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    src = dst = None  # free the 2 GiB before empty_cache
    torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e-3) / 1e9

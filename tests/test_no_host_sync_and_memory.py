"""A fused forward+backward never reads a tensor back to the host (so it can be captured in a
CUDA graph), and needs no full-size temporary besides the gradient."""

import gc

import pytest
import torch
from helpers import FailOnHostSync, make_inputs
from loss_calls import CALLS, call
from torch.profiler import ProfilerActivity, profile


def test_sync_detector_catches_item():
    with pytest.raises(AssertionError, match="host synchronisation"):
        with FailOnHostSync():
            torch.ones(3).sum().item()


@pytest.mark.parametrize("name", sorted(CALLS))
def test_forward_backward_makes_no_host_sync(name, device):
    model, ref, target = make_inputs((4, 3, 9, 11), torch.float32, device, 1, 0.05)
    model.requires_grad_(True)
    with FailOnHostSync():
        loss, metrics = call(name, model, ref, target)
        loss.backward(torch.tensor(0.5, dtype=loss.dtype, device=loss.device))
    assert model.grad is not None and bool(torch.isfinite(model.grad).all())
    assert all(not v.requires_grad for v in metrics.values())


def peak_extra_bytes(fn):
    """Peak of CPU allocator bytes live during fn() beyond those live at its start. The garbage
    collector is held off so that no older tensor is freed inside the window."""
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        gc.enable()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU allocator accounting; the GPU test uses CUDA stats")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_extra_memory_is_one_gradient(name, dtype, device):
    model, ref, target = make_inputs((8, 4, 16, 16), dtype, device, 2, 0.05)  # a 16-32 KiB gradient: 4x the slack
    model.requires_grad_(True)

    def step():
        loss, _ = call(name, model, ref, target)
        loss.backward()

    step()  # first call: caches, lazy initialisation
    model.grad = None
    extra = peak_extra_bytes(step)
    grad_bytes = model.numel() * model.element_size()
    assert extra >= grad_bytes, f"the gradient itself ({grad_bytes} B) must show up, measured {extra} B"
    assert extra <= grad_bytes + 4096, f"{name}: {extra} B extra for a {grad_bytes} B gradient"

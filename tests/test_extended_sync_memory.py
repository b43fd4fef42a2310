"""The extended losses (spec §2.4-2.10): a fused forward+backward never reads a tensor back to
the host (CUDA-graph capturable), and needs no full-size temporary besides the gradient."""
import pytest
import torch

from helpers import make_inputs
from loss_calls_extended import CALLS_EXTENDED, call, resolve
from test_no_host_sync_and_memory import FailOnHostSync, peak_extra_bytes


@pytest.mark.parametrize("name", sorted(CALLS_EXTENDED))
def test_forward_backward_makes_no_host_sync(name, device):
    model, ref, target = make_inputs((4, 3, 9, 11), torch.float32, device, 1, 0.05)
    model.requires_grad_(True)
    resolved = resolve(name, model)
    with FailOnHostSync():
        loss, metrics = call(name, model, ref, target, resolved)
        loss.backward(torch.tensor(0.5, dtype=loss.dtype, device=loss.device))
    assert model.grad is not None and bool(torch.isfinite(model.grad).all())
    assert all(not v.requires_grad for v in metrics.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU allocator accounting; the GPU test uses CUDA stats")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CALLS_EXTENDED))
def test_extra_memory_is_one_gradient(name, dtype, device):
    model, ref, target = make_inputs((8, 4, 16, 24), dtype, device, 2, 0.05)
    model.requires_grad_(True)
    resolved = resolve(name, model)

    def step():
        loss, _ = call(name, model, ref, target, resolved)
        loss.backward()

    step()                                   # first call: caches, lazy initialisation
    model.grad = None
    extra = peak_extra_bytes(step)
    grad_bytes = model.numel() * model.element_size()
    assert extra >= grad_bytes, f"the gradient itself ({grad_bytes} B) must show up, measured {extra} B"
    assert extra <= grad_bytes + 4096, f"{name}: {extra} B extra for a {grad_bytes} B gradient"

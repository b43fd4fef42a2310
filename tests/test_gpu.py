"""Compiled kernels at real latent shapes, CUDA-graph capture and CUDA memory. These need a
CUDA GPU; on a machine without one every check above runs the same kernels interpreted."""

import pytest
import reference
import torch
from helpers import amplification, assert_close, assert_grad_close, make_inputs, run
from loss_calls import CALLS, call

import fastpref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REAL_SHAPES = {
    "sd15-512-B8": (16, 4, 64, 64),
    "sdxl-1024-B4": (8, 4, 128, 128),
    "video-16x64x64-B2": (4, 4, 16, 64, 64),
}
REFERENCES = {
    "dpo_sigmoid": reference.dpo,
    "dpo_hinge": reference.dpo,
    "dpo_ipo": reference.dpo,
    "dspo_sd15": reference.dspo,
    "dspo_sdxl": reference.dspo,
}


def reference_on_gpu(name, model, ref, target, G):
    """The float64 reference (docs/methods.md), evaluated on the GPU (real shapes are slow on the CPU)."""
    kw = CALLS[name][2]
    leaf = model.detach().double().requires_grad_(True)
    if name.startswith("sft"):
        loss, metrics = reference.sft(leaf, target.double(), **kw)
    else:
        loss, metrics = REFERENCES[name](leaf, ref.double(), target.double(), **kw)
    loss.backward(G.double())
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape_name", sorted(REAL_SHAPES))
@pytest.mark.parametrize("name", sorted(REFERENCES) + ["sft", "sft_winners"])
def test_real_shapes_match_float64(name, shape_name, dtype):
    inputs = make_inputs(REAL_SHAPES[shape_name], dtype, torch.device("cuda"), 0, 0.01)
    loss, _, grad, G = run(lambda *a, **k: call(name, *a), *inputs)
    ref_loss, ref_grad = reference_on_gpu(name, *inputs, G)
    beta = CALLS[name][2].get("beta", 1.0)
    rtol = 4e-6 * amplification(*inputs, beta)
    assert_close("loss", loss, ref_loss, rtol, atol=rtol)
    assert_grad_close(grad.cpu(), ref_grad.cpu(), dtype, rtol)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_forward_backward_is_capturable_in_a_cuda_graph(name):
    """Capture loss + backward once, replay on new data: same loss and gradient as eager."""
    device = torch.device("cuda")
    shape = (8, 4, 32, 32)
    static = [x.clone() for x in make_inputs(shape, torch.float32, device, 0, 0.05)]
    static[0].requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) off-graph
        for _ in range(2):
            static[0].grad = None
            loss, metrics = call(name, *static)
            loss.backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static[0].grad = None
    with torch.cuda.graph(graph):
        g_loss, g_metrics = call(name, *static)
        g_loss.backward()
    for seed in (1, 2):
        fresh = make_inputs(shape, torch.float32, device, seed, 0.05)
        with torch.no_grad():
            for s, f in zip(static, fresh, strict=True):
                s.copy_(f)
        graph.replay()
        eager_loss, eager_metrics, eager_grad, _ = run(lambda *a, **k: call(name, *a), *fresh, grad_scale=1.0)
        torch.cuda.synchronize()
        assert torch.equal(g_loss, eager_loss), f"{name}: replayed loss differs"
        assert torch.equal(static[0].grad, eager_grad), f"{name}: replayed gradient differs"
        for key in eager_metrics:
            assert torch.equal(g_metrics[key], eager_metrics[key]), f"{name}: metric {key} differs"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_cuda_extra_memory_is_one_gradient(name):
    device = torch.device("cuda")
    inputs = make_inputs((16, 4, 64, 64), torch.bfloat16, device, 0, 0.05)
    inputs[0].requires_grad_(True)
    loss, _ = call(name, *inputs)
    loss.backward()
    inputs[0].grad = None
    del loss
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = call(name, *inputs)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = inputs[0].numel() * inputs[0].element_size()
    assert grad_bytes <= extra <= grad_bytes + 64 * 1024, f"{name}: {extra} B extra for a {grad_bytes} B gradient"


def test_dspo_sdxl_branch_is_chosen_on_device_inside_a_graph():
    """The same captured graph takes branch 2 at q = 0 and branch 1 once the policy moves."""
    device = torch.device("cuda")
    model, ref, target = make_inputs((8, 4, 16, 16), torch.float32, device, 0, 0.05)
    static = model.clone().requires_grad_(True)
    kw = dict(beta=5000.0, variant="sdxl", sdxl_threshold=0.001)
    for _ in range(2):
        fastpref.dspo_loss(static, ref, target, **kw)[0].backward()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, metrics = fastpref.dspo_loss(static, ref, target, **kw)
        loss.backward()
    with torch.no_grad():
        static.copy_(ref)
    graph.replay()
    assert int(metrics["sdxl_branch"]) == 2
    with torch.no_grad():
        static.copy_(model)
    graph.replay()
    assert int(metrics["sdxl_branch"]) == 1

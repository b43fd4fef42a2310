"""The opt-in one-launch forward (kernels/fused.py): the head run by the last row-sum program to
draw a ticket, forward + backward in two launches, the same bits as the default path.

Here (the interpreter on CPU, or a GPU): every method equals the default path bit for bit in
loss, metrics and gradient, with rows split across several programs, and the ticket counter is
back at zero after each call. The interpreter runs programs one after another, so it cannot
show a race: `test_gpu_stress_bitwise` (CUDA only; `bash benchmarks/run_gpu.sh one-launch`) runs
many shapes thousands of times, eagerly and replayed from a CUDA graph, and must find every
result equal to the default path's before the one-launch path may become the default."""

import pytest
import torch
from helpers import RecordOps, make_inputs
from loss_calls import call

from fastpref.kernels import PRESETS, REGISTRY, _runtime

ONE_PER_METHOD = [method.presets[0][0] for method in REGISTRY.values()]


@pytest.fixture
def one_launch():
    """Run the test body with the one-launch forward on; restore the previous setting after."""
    previous = _runtime.set_one_launch(True)
    yield
    _runtime.set_one_launch(previous)


def _fwd_bwd(name, x, r, t):
    leaf = x.detach().clone().requires_grad_(True)
    loss, metrics = call(name, leaf, r, t)
    loss.backward(torch.tensor(0.75, dtype=loss.dtype, device=loss.device))
    return loss.detach(), metrics, leaf.grad


def _bits(x):
    """The bit pattern of a float tensor (so -0.0 != 0.0 and NaN payloads count)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return x.view(ints[x.element_size()]) if x.dtype.is_floating_point else x


def _mismatches(a, b):
    """Number of differing elements of two (loss, metrics, grad) results, as a device tensor."""
    (l1, m1, g1), (l2, m2, g2) = a, b
    assert m1.keys() == m2.keys()
    pairs = [(l1, l2), (g1, g2)] + [(m1[k], m2[k]) for k in m1]
    return sum((_bits(x) != _bits(y)).sum() for x, y in pairs)


@pytest.mark.parametrize("name", ONE_PER_METHOD)
def test_one_launch_equals_the_default_path(name, device):
    x, r, t = make_inputs((4, 3, 37, 41), (torch.bfloat16, torch.float32, torch.float32), device, 21, 0.05)
    programs = x.shape[0] // 2 if PRESETS[name][0].cross else x.shape[0]
    assert _runtime.row_split(programs, x[0].numel(), 1024, x.device)[0] > 1, "rows must be split across programs"
    default = _fwd_bwd(name, x, r, t)
    previous = _runtime.set_one_launch(True)
    try:
        fused = _fwd_bwd(name, x, r, t)
    finally:
        _runtime.set_one_launch(previous)
    assert torch.isfinite(default[0]) and default[2].abs().sum() > 0
    assert int(_mismatches(default, fused)) == 0, name
    assert int(_runtime.ticket(x.device)) == 0, "the last program must reset the ticket"


def test_one_launch_is_one_launch_forward_two_with_backward(device, one_launch):
    x, r, t = make_inputs((4, 4, 16, 16), torch.float32, device, 22, 0.05)
    leaf = x.clone().requires_grad_(True)
    with RecordOps() as rec:
        loss, _ = call("dpo_sigmoid", leaf, r, t)
    forward = [op[0] for op in rec.ops if op[0].startswith("triton:")]
    with RecordOps() as rec:
        loss.backward()
    backward = [op[0] for op in rec.ops if op[0].startswith("triton:")]
    assert forward == ["triton:_row_sums_head_kernel"] and backward == ["triton:_grad_kernel"]


def _stress_cases():
    """(method preset, shape, dtype, repeats): pairs from 1 to 32, rows from one element to 64K
    elements (from one program per row to the 4-per-SM maximum of the row split)."""
    cases = []
    for name in ("dpo_sigmoid", "sdpo", "sft", "kto", "rpo"):
        for shape in ((2, 1, 1, 1), (2, 4, 8, 8), (8, 4, 64, 64), (16, 4, 32, 32), (64, 4, 16, 16), (4, 4, 128, 128)):
            for dtype in (torch.bfloat16, torch.float32):
                cases.append((name, shape, dtype, 1000 if shape[1] * shape[2] * shape[3] <= 4096 else 300))
    return cases


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: a race needs programs that run concurrently")
def test_gpu_stress_bitwise():
    """Every stress case, eager (forward + backward, `repeats` times) and replayed from a CUDA
    graph (forward, 1000 times), equals the default path bit for bit, and the ticket ends at 0.
    Mismatches are counted on the device and read once per case."""
    total = 0
    for name, shape, dtype, repeats in _stress_cases():
        x, r, t = make_inputs(shape, dtype, "cuda", 23, 0.05)
        default = _fwd_bwd(name, x, r, t)
        previous = _runtime.set_one_launch(True)
        try:
            bad = torch.zeros((), dtype=torch.int64, device="cuda")
            for _ in range(repeats):
                bad += _mismatches(default, _fwd_bwd(name, x, r, t))
            with torch.no_grad():
                call(name, x, r, t)  # the ticket and the caches exist before the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured = call(name, x, r, t)
                for _ in range(1000):
                    graph.replay()
                    bad += _mismatches((default[0], default[1], default[2]), (captured[0], captured[1], default[2]))
        finally:
            _runtime.set_one_launch(previous)
        count = int(bad)  # host-ok: one read per case, after its repeats
        assert count == 0, f"{name} {shape} {dtype}: {count} elements differ from the default path"
        assert int(_runtime.ticket(x.device)) == 0  # host-ok: once per case
        total += repeats + 1000
    assert total >= 100_000

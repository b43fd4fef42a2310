"""The fused losses inside torch.compile, torch.export and shape inference (fastpref/ops.py).

Every public loss (one call per method, the first preset of each descriptor) under
`torch.compile(fullgraph=True)` with aot_eager gives the eager loss, metrics and gradient bit for
bit (the same kernels run); Inductor does too on four representative methods (an extra input,
int metrics, no reference, a None among the inputs). FakeTensor and meta inputs give every
preset's output shapes, dtypes and strides without a kernel; torch.export keeps the operator in
its graph and its module gives the eager numbers. On CUDA the same tests compile the
`triton_op`s; a CPU subprocess with the interpreter off checks that the traced CUDA operators
decompose into the row-sum and gradient launches, cloning nothing but their own outputs."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import make_inputs
from loss_calls import _EXTRA, CALLS, _emb
from torch._subclasses.fake_tensor import FakeTensorMode

import fastpref
from fastpref.kernels import REGISTRY

SHAPE = (4, 3, 5, 7)
ONE_PER_METHOD = [method.presets[0][0] for method in REGISTRY.values()]
INDUCTOR = ["dpo_sigmoid", "kto", "sdpo_dspo_sdxl", "sft_winners"]


def _extras(name, model_pred):
    """The extra tensors of preset `name` (built eagerly: a compiled test function takes them)."""
    return [_emb(model_pred) if e == "emb" else _EXTRA[e](model_pred) for e in CALLS[name][3]]


def _caller(name):
    """f(model_pred, ref_pred, target, *extras) -> (loss, metrics) of preset `name`."""
    fn, uses_ref, kw, extras = CALLS[name]

    def f(x, r, t, *tensors):
        kwargs, args = dict(kw), []
        for extra, tensor in zip(extras, tensors, strict=True):
            if extra == "emb":
                kwargs["emb_w"] = tensor
            else:
                args.append(tensor)
        return fn(x, r, t, *args, **kwargs) if uses_ref else fn(x, t, *args, **kwargs)

    return f


def _run(f, x, *others):
    leaf = x.detach().clone().requires_grad_(True)
    loss, metrics = f(leaf, *others)
    loss.backward(torch.tensor(0.75, dtype=loss.dtype, device=loss.device))
    return loss.detach(), metrics, leaf.grad


def _assert_same(name, eager, compiled):
    (l1, m1, g1), (l2, m2, g2) = eager, compiled
    assert torch.equal(l1, l2), f"{name}: loss {l1} != {l2}"
    assert m1.keys() == m2.keys(), f"{name}: metric names differ"
    for key in m1:
        assert m1[key].dtype == m2[key].dtype and torch.equal(m1[key], m2[key]), f"{name}: metric {key} differs"
        assert not m2[key].requires_grad
    assert torch.equal(g1, g2), f"{name}: gradient differs"


def _compiled_equals_eager(name, backend, device):
    x, r, t = make_inputs(SHAPE, torch.float32, device, 11, 0.05)
    extras = _extras(name, x)
    f = _caller(name)
    eager = _run(f, x, r, t, *extras)
    assert torch.isfinite(eager[0]) and eager[2].abs().sum() > 0, f"{name}: a degenerate eager call"
    torch._dynamo.reset()  # every preset's `f` shares one code object: no recompile limit
    compiled = _run(torch.compile(f, fullgraph=True, backend=backend), x, r, t, *extras)
    _assert_same(name, eager, compiled)


@pytest.mark.parametrize("name", ONE_PER_METHOD)
def test_aot_eager_fullgraph_equals_eager(name, device):
    _compiled_equals_eager(name, "aot_eager", device)


@pytest.mark.parametrize("name", INDUCTOR)
def test_inductor_fullgraph_equals_eager(name, device):
    _compiled_equals_eager(name, "inductor", device)


def test_generic_loss_compiles(device):
    """A method served by `losses.generic_loss` (signature from its descriptor) also traces."""
    f = fastpref.losses.generic_loss(REGISTRY["dmpo"])
    x, r, t = make_inputs(SHAPE, torch.float32, device, 12, 0.05)
    _assert_same("generic dmpo", _run(f, x, r, t), _run(torch.compile(f, fullgraph=True, backend="aot_eager"), x, r, t))


def _spec(x):
    return tuple(x.shape), x.dtype, x.stride()


def test_fake_and_meta_outputs_match_the_real_ones(device):
    """Every preset: outputs and gradient of FakeTensor and meta inputs have the real shapes,
    dtypes and strides (mixed inputs: float64 loss and metrics, int64 integer metrics, a
    bfloat16 gradient)."""
    for name in sorted(CALLS):
        x, r, t = make_inputs(SHAPE, (torch.bfloat16, torch.float16, torch.float64), device, 13, 0.05)
        extras = _extras(name, x)
        f = _caller(name)
        loss, metrics, grad = _run(f, x, r, t, *extras)
        real = [_spec(loss), _spec(grad)] + [(k, *_spec(v)) for k, v in metrics.items()]
        with FakeTensorMode() as mode:
            fakes = [mode.from_tensor(a) for a in (x, r, t, *extras)]
            fl, fm, fg = _run(f, *fakes)
            assert isinstance(fl, torch._subclasses.FakeTensor)
            fake = [_spec(fl), _spec(fg)] + [(k, *_spec(v)) for k, v in fm.items()]
        assert fake == real, name
        ml, mm, mg = _run(f, *(a.to("meta") for a in (x, r, t, *extras)))
        assert ml.device.type == "meta" and mg.device.type == "meta"
        assert [_spec(ml), _spec(mg)] + [(k, *_spec(v)) for k, v in mm.items()] == real, name


@pytest.mark.parametrize("name", ["dpo_sigmoid", "kto"])
def test_torch_export(name, device):
    """torch.export keeps `fastpref::fused_loss` in its graph; the exported module runs it."""
    f = _caller(name)

    class Loss(torch.nn.Module):
        def forward(self, x, r, t, *extras):
            return f(x, r, t, *extras)

    x, r, t = make_inputs(SHAPE, torch.float32, device, 14, 0.05)
    args = (x, r, t, *_extras(name, x))
    program = torch.export.export(Loss(), args)
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert torch.ops.fastpref.fused_loss.default in targets
    loss, metrics = Loss()(*args)
    loss2, metrics2 = program.module()(*args)
    assert torch.equal(loss, loss2) and all(torch.equal(metrics[k], metrics2[k]) for k in metrics)


def test_head_operator_equals_the_forward(device):
    """`fastpref::head`, which a traced CUDA forward calls after its row-sum launch, writes the
    same buffer as the whole forward operator (here on this device's kernels)."""
    from fastpref.kernels.reduce import partial_sums

    x, r, t = make_inputs(SHAPE, torch.float32, device, 15, 0.05)
    args = ([], "dpo", "hinge", [50.0])
    loss, buf = torch.ops.fastpref.fused_loss(x, r, t, *args, 2)
    partials, _ = partial_sums(x.reshape(4, -1), r.reshape(4, -1), t.reshape(4, -1), torch.float32)
    loss2, buf2 = torch.ops.fastpref.head(partials, *args, 4, 2, x[0].numel())
    assert torch.isfinite(loss) and torch.equal(loss, loss2)
    # (slots this method leaves unwritten, its ints and b coefficients, hold the poison NaN in both)
    torch.testing.assert_close(buf, buf2, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(buf[2:-4]).all()


TRACE_CUDA_OPERATORS = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget

    class Driver:  # what the kernels would be compiled for: lets the mutation analysis run here
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Driver())
    import fastpref
    assert not fastpref.kernels.INTERPRET
    graphs = []


    class Traced(Exception):
        pass


    def stop(*args):
        raise Traced


    def capture(gm, example_inputs):
        from torch._functorch.aot_autograd import aot_module_simplified

        def forward(graph, _):
            graphs.append(graph)
            return stop  # traced, not run

        return aot_module_simplified(gm, example_inputs, fw_compiler=forward)

    x, r, t = (torch.randn(4, 4, 16, 16) for _ in range(3))
    buf = torch.zeros(40)
    for fn in (lambda x, r, t: torch.ops.fastpref.fused_loss(x, r, t, [], "dpo", "sigmoid", [5000.0], 2),
               lambda x, r, t: torch.ops.fastpref.fused_loss_backward(x, None, t, buf, buf[0], 21)):
        try:
            torch.compile(fn, backend=capture, fullgraph=True)(x, r, t)
        except Traced:
            pass
    for graph in graphs:
        for node in graph.graph.nodes:
            if node.op == "call_function":
                name = str(node.target)
                if "triton_kernel_wrapper" in name:
                    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
                    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                    name = kernel.fn.__name__ + " clones " + ",".join(node.kwargs["tensors_to_clone"])
                print("NODE", name)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the compiled tests above run the triton_ops themselves")
def test_cuda_operators_decompose_into_visible_launches():
    """With compiled kernels (CUDA), the operators are triton_ops: traced, the forward is the
    row-sum launch (a HOP Inductor schedules, cloning only its partials) and the opaque head
    operator; the backward is the gradient launch (cloning only the gradient). Traced here on
    CPU tensors with the interpreter off; running them needs a GPU (tests above, on CUDA)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}  # fastpref as installed
    out = subprocess.run(
        [sys.executable, "-c", TRACE_CUDA_OPERATORS], env=env, capture_output=True, text=True, timeout=300
    )
    nodes = [line[5:] for line in out.stdout.splitlines() if line.startswith("NODE ")]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "_row_sums_kernel clones part_ptr" in nodes and "fastpref.head.default" in nodes, nodes
    assert "_grad_kernel clones grad_ptr" in nodes, nodes
    assert not any(n.startswith("fastpref.fused_loss") for n in nodes), nodes  # decomposed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: Inductor's generated code for the GPU")
def test_inductor_generates_the_kernels_on_cuda():
    """On CUDA, Inductor's output code launches the row-sum and gradient kernels itself, and a
    compiled forward+backward needs no more memory than the eager one."""
    from torch._inductor.utils import run_and_get_code

    f = _caller("dpo_sigmoid")
    x, r, t = make_inputs((8, 4, 64, 64), torch.bfloat16, "cuda", 16, 0.05)
    compiled = torch.compile(f, fullgraph=True)
    eager = _run(f, x, r, t)
    result, codes = run_and_get_code(lambda: _run(compiled, x, r, t))
    _assert_same("dpo_sigmoid cuda", eager, result)
    code = "\n".join(codes)
    assert "_row_sums_kernel" in code and "_grad_kernel" in code

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert peak(lambda: _run(compiled, x, r, t)) <= peak(lambda: _run(f, x, r, t)) + 2**20

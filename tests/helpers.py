"""Shared test helpers: random paired inputs, running a loss and its float64 reference."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastpref.kernels import INTERPRET

# Where fastpref's kernels can run in this test session (conftest.py turns the interpreter on
# when there is no CUDA, unless TRITON_INTERPRET is already set): CUDA tensors always compile;
# CPU tensors need the interpreter, which is off on a CUDA machine.
KERNELS_RUN_HERE = torch.cuda.is_available() or INTERPRET
NO_KERNELS_HERE = (
    "needs Triton's interpreter or a CUDA device: this machine has no CUDA and "
    "TRITON_INTERPRET is not 1, so no kernel can run"
)
# a test that runs the kernels where the code under test puts its tensors (the trainer: CUDA
# where there is a GPU); a test with tensors of its own takes conftest's ``device`` fixture
needs_kernels = pytest.mark.skipif(not KERNELS_RUN_HERE, reason=NO_KERNELS_HERE)

EPS32 = 2.0**-24
# Output rounding of the gradient store: relative (a full ulp, double the round-to-nearest
# error), plus float16's subnormal spacing for tiny gradient entries.
OUT_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
OUT_ATOL = {torch.float64: 0.0, torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}


def make_inputs(shape, dtypes, device, seed, scale=0.05):
    """Fresh random (model_pred, ref_pred, target): target ~ N(0, 1), the reference off by
    ~0.5 and the policy off the reference by `scale` (so inside is O(1) for a suitable scale).
    dtypes: one dtype or a (model, ref, target) triple."""
    if isinstance(dtypes, torch.dtype):
        dtypes = (dtypes,) * 3
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = target + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    model = ref + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return tuple(x.to(dt).to(device) for x, dt in zip((model, ref, target), dtypes, strict=True))


def run(fn, model_pred, *others, grad_scale=None, **kw):
    """Forward + backward of a loss with a random incoming gradient G (never the G == 1 case).
    Returns (loss, metrics, grad of model_pred, G)."""
    leaf = model_pred.detach().clone().requires_grad_(True)
    loss, metrics = fn(leaf, *others, **kw)
    G = torch.tensor(0.75 if grad_scale is None else grad_scale, dtype=loss.dtype, device=loss.device)
    loss.backward(G)
    return loss.detach(), metrics, leaf.grad, G


def forward_backward(fn, model_pred, *others, **kw):
    """``fn(model_pred leaf, *others, **kw)`` (its first output the loss) backward with an
    incoming gradient of 0.75. Returns (fn's outputs, grad of model_pred)."""
    leaf = model_pred.detach().clone().requires_grad_(True)
    out = fn(leaf, *others, **kw)
    out[0].backward(torch.tensor(0.75, dtype=out[0].dtype, device=out[0].device))
    return out, leaf.grad


def run_reference(ref_fn, model_pred, *others, G, **kw):
    """The float64 reference on the same (already rounded) inputs."""
    leaf = model_pred.detach().double().cpu().requires_grad_(True)
    others64 = [o.detach().double().cpu() if isinstance(o, torch.Tensor) else o for o in others]
    loss, metrics = ref_fn(leaf, *others64, **kw)
    loss.backward(G.double().cpu())
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, leaf.grad


def amplification(model_pred, ref_pred, target, beta):
    """How much β amplifies rounding of the per-row errors (docs/methods.md §4): 1 + β * max(|m| + |r|)."""
    m = ((model_pred.double() - target.double()) ** 2).flatten(1).mean(1).cpu()
    r = ((ref_pred.double() - target.double()) ** 2).flatten(1).mean(1).cpu()
    return 1.0 + beta * float((m + r).max())


def assert_close(name, actual, expected, rtol, atol=0.0):
    """max |actual - expected| <= rtol * max |expected| + atol (relative to the tensor's scale)."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values {a}"
    err = float((a - e).abs().max()) if a.numel() else 0.0
    bound = rtol * float(e.abs().max()) + atol if e.numel() else 0.0
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} (rtol {rtol:.1e}); got {a}, expected {e}"


def assert_grad_close(grad, expected, dtype, rtol):
    """Gradient check: the compute error (rtol, relative to the gradient's scale) plus the
    output rounding of `dtype` element by element."""
    g = grad.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert grad.dtype == dtype, f"gradient dtype {grad.dtype} != model_pred dtype {dtype}"
    assert torch.isfinite(g).all(), "non-finite gradient"
    bound = OUT_RTOL[dtype] * e.abs() + OUT_ATOL[dtype] + rtol * float(e.abs().max()) + 1e-30
    worst = float(((g - e).abs() / bound).max())
    assert worst <= 1.0, f"gradient error {worst:.2f} x the bound (rtol {rtol:.1e}, dtype {dtype})"


def case_id(shape, dtypes):
    """Test id of a (shape, dtypes) case, e.g. 6x3x25x41-float32/float16/float16."""
    d = dtypes if isinstance(dtypes, torch.dtype) else "/".join(map(str, dtypes))
    return f"{'x'.join(map(str, shape))}-{d}".replace("torch.", "")


def compute_dtype(inputs):
    """float64 if any tensor input is float64, else float32 (docs/methods.md §1)."""
    return (
        torch.float64
        if any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in inputs)
        else torch.float32
    )


def compute_rtol(inputs, beta):
    """Compute-error budget (docs/methods.md §4): fp32 (or fp64) rounding of the per-row errors, amplified
    by β (the factor on the error differences inside the sigmoid)."""
    base = 1e-12 if compute_dtype(inputs) == torch.float64 else 4e-6
    return base * amplification(*inputs, beta)


def check_accuracy(name, value, decision, tol):
    """mean 1[decision > 0] equals the reference's up to entries within tol of 0."""
    exp = (decision > 0).double().mean()
    ambiguous = int((decision.abs() <= tol).sum())
    assert abs(float(value) - float(exp)) <= ambiguous / decision.numel() + 1e-6, (
        f"{name}: {float(value)} vs reference {float(exp)} ({ambiguous} ambiguous)"
    )


SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}


class FailOnHostSync(TorchDispatchMode):
    """Raises on any op that reads a tensor value back to the host (.item(), bool(), equal)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


class RecordOps(TorchDispatchMode):
    """Records every aten op and every Triton kernel launch with its arguments, each tensor
    reduced to (shape, stride, dtype, device): what a CUDA graph freezes at capture. Two steps
    that record the same list issue the same launches with the same scalar arguments, so a
    replay of one is the other."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self._patched = []

    @staticmethod
    def _signature(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device)
        if isinstance(value, (list, tuple)):
            return tuple(RecordOps._signature(v) for v in value)
        if isinstance(value, float):
            return value.hex()  # compares NaN equal to NaN
        if value is None or isinstance(
            value, (bool, int, str, torch.dtype, torch.device, torch.layout, torch.memory_format)
        ):
            return value
        return type(value).__name__  # an opaque handle (e.g. a profiler record), not an argument

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func), self._signature(args), self._signature(sorted(kwargs.items()))))
        return func(*args, **kwargs)

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        for cls in (InterpretedFunction, JITFunction):
            original = cls.run

            def run(kernel, *args, grid, warmup, _original=original, **kwargs):
                self.ops.append(
                    (
                        "triton:" + kernel.__name__,
                        self._signature(args),
                        self._signature(sorted(kwargs.items())),
                        self._signature(grid),
                    )
                )
                return _original(kernel, *args, grid=grid, warmup=warmup, **kwargs)

            cls.run = run
            self._patched.append((cls, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, original in self._patched:
            cls.run = original
        self._patched.clear()
        return super().__exit__(*exc)


def bad_input_case_ids(cases):
    """Test ids of a ``cases(device)`` generator of ``(argument name(s), exception, call)``."""
    return [
        f"{i}-{arg if isinstance(arg, str) else arg[0]}" for i, (arg, _, _) in enumerate(cases(torch.device("cpu")))
    ]


def assert_bad_input_case(cases, index, device):
    """Case ``index`` of ``cases(device)`` raises its exception, whose message names the
    argument (or one of the argument names)."""
    import pytest

    arg, exc, fn = list(cases(device))[index]
    with pytest.raises(exc) as info:
        fn()
    names = (arg,) if isinstance(arg, str) else arg
    assert any(a in str(info.value) for a in names), f"message does not name {names}: {info.value}"

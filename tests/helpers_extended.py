"""Helpers for the extended-loss tests (docs/methods.md §2.4-2.10): input builders for the methods'
extra arguments, and one kernel-versus-float64-reference check shared by every method.

Reference functions may return, besides docs/methods.md's metrics, keys starting with "_": the
float64 decision values behind an accuracy metric (e.g. "_implicit_acc" holds the inside
values whose sign `implicit_acc` counts). They are compared by sign, with pairs within
rounding of 0 allowed either way, and are not metric keys themselves."""

import math

import torch
from helpers import assert_close, assert_grad_close, check_accuracy, compute_dtype, run, run_reference

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# (shape, dtypes): n = 3 * 25 * 41 = 3075 elements per row (several blocks of 1024, ending in a
# partial one) in every dtype and two mixes; B = 1; 5-D video latents with a three-way mix.
CASES = [
    ((6, 3, 25, 41), F32),
    ((6, 3, 25, 41), F16),
    ((6, 3, 25, 41), BF16),
    ((6, 3, 25, 41), F64),
    ((6, 3, 25, 41), (F32, F16, F16)),
    ((6, 3, 25, 41), (BF16, F32, F16)),
    ((2, 4, 8, 8), F32),
    ((4, 2, 3, 5, 7), (F16, BF16, F32)),
]
# Unpaired (KTO): odd N, N = 1, 5-D.
UNPAIRED_CASES = [
    ((5, 3, 25, 41), F32),
    ((5, 3, 25, 41), F16),
    ((5, 3, 25, 41), BF16),
    ((5, 3, 25, 41), F64),
    ((5, 3, 25, 41), (F32, F16, F16)),
    ((1, 4, 8, 8), F32),
    ((3, 2, 3, 5, 7), (F16, BF16, F32)),
]


def mapo_rtol(model_pred, target, beta, snr_value, T):
    """MaPO's budget: u = T (f_w - f_l) amplifies the rounding of m through h' (|h'| <= 1/2) by
    T s, and the rounding of f itself (|f| <= 1, two roundings) by T; the loss and gradient see u
    through β log σ(u)."""
    f64 = F64 in (model_pred.dtype, target.dtype)
    base, unit = (1e-12, 2.0**-51) if f64 else (4e-6, 2.0**-22)
    m = ((model_pred.double() - target.double()) ** 2).flatten(1).mean(1)
    return base * (1 + T * snr_value * float(m.max())) + T * unit * (1 + beta)


def correlated_inputs(shape, dtypes, device, seed, scale=0.05, rho=0.5):
    """Paired inputs whose winner and loser errors e = model_pred - target are correlated
    (correlation about rho), so SDPO's den = 4 S_wl / K^2 has a clear sign. dtypes as in
    `helpers.make_inputs`."""
    if isinstance(dtypes, torch.dtype):
        dtypes = (dtypes,) * 3
    g = torch.Generator().manual_seed(seed)
    B = shape[0] // 2
    target = torch.randn(shape, generator=g, dtype=F64)
    common = torch.randn((B,) + tuple(shape[1:]), generator=g, dtype=F64)
    own = torch.randn(shape, generator=g, dtype=F64)
    shared = torch.cat([common, common])
    off = (
        math.sqrt(abs(rho))
        * shared
        * torch.tensor([1.0] * B + [math.copysign(1.0, rho)] * B, dtype=F64).view((-1,) + (1,) * (len(shape) - 1))
    )
    ref = target + 0.5 * (off + math.sqrt(1 - abs(rho)) * own)
    model = ref + scale * torch.randn(shape, generator=g, dtype=F64)
    return tuple(x.to(dt).to(device) for x, dt in zip((model, ref, target), dtypes, strict=True))


def random_labels(n, seed, dtype=torch.int64, device="cpu"):
    """[n] labels with both classes present (n >= 2): nonzero = desirable. For float dtypes the
    desirable value is a non-unit nonzero (e.g. 0.5 or -2), which still counts as desirable."""
    g = torch.Generator().manual_seed(seed)
    good = torch.rand(n, generator=g) > 0.5
    if n >= 2:
        good[0], good[1] = True, False
    if dtype == torch.bool:
        return good.to(device)
    if dtype.is_floating_point:
        vals = torch.where(torch.arange(n) % 2 == 0, 0.5, -2.0)
        return torch.where(good, vals, 0.0).to(dtype).to(device)
    return torch.where(good, 3, 0).to(dtype).to(device)


def random_embeddings(B, D, seed, dtype=F32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=F64).to(dtype).to(device)


def check_metrics(metrics, expected, rtol, compute, tie_tol):
    """Same keys; detached; floating metrics in the compute dtype and close to the reference;
    integer metrics equal; accuracies compared by the sign of the reference's decision values
    ("_name" keys), up to values within tie_tol of 0."""
    decisions = {k[1:]: v for k, v in expected.items() if k.startswith("_")}
    expected = {k: v for k, v in expected.items() if not k.startswith("_")}
    assert set(metrics) == set(expected), f"metric keys {sorted(metrics)} != {sorted(expected)}"
    for name, value in metrics.items():
        assert not value.requires_grad, f"metric {name} must be detached"
        assert value.shape == expected[name].shape, (
            f"{name}: shape {tuple(value.shape)} != {tuple(expected[name].shape)}"
        )
        if name in decisions:
            check_accuracy(name, value, decisions[name], tie_tol)
        elif value.dtype.is_floating_point:
            assert value.dtype == compute, f"metric {name} in {value.dtype}, expected the compute dtype {compute}"
            assert_close(name, value, expected[name], rtol, atol=rtol)
        else:
            assert torch.equal(value.cpu(), expected[name].to(value.dtype)), f"{name}: {value} != {expected[name]}"


def check_against_reference(fn, ref_fn, inputs, extra=(), *, rtol, grad_rtol=None, **kw):
    """Run fn(*inputs, *extra, **kw) forward and backward with a random incoming gradient and
    compare loss (0-dim, compute dtype), gradient (model_pred's dtype) and every metric with
    ref_fn on float64 copies. Returns (metrics, reference metrics, grad, reference grad)."""
    loss, metrics, grad, G = run(fn, *inputs, *extra, **kw)
    ref_loss, ref_metrics, ref_grad = run_reference(ref_fn, *inputs, *extra, G=G, **kw)
    compute = compute_dtype(inputs)  # the predictions decide it (docs/methods.md §1)
    assert loss.dtype == compute and loss.shape == (), f"loss {loss.dtype} {tuple(loss.shape)}"
    assert_close("loss", loss, ref_loss, rtol, atol=rtol)
    assert_grad_close(grad, ref_grad, inputs[0].dtype, grad_rtol or rtol)
    scale = max([1.0] + [float(v.abs().max()) for k, v in ref_metrics.items() if k.startswith("_") and v.numel()])
    check_metrics(metrics, ref_metrics, rtol, compute, rtol * scale)
    return metrics, ref_metrics, grad, ref_grad

"""Numerically stable scalar functions shared by the heads (spec §4, "Stable forms").

Built from exp and log only: the interpreter has no libdevice."""
import triton
import triton.language as tl


@triton.jit
def f64(hi, lo, ACC: tl.constexpr):
    """Rebuild a hyperparameter passed as an fp32 (hi, lo) pair in the accumulation dtype."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def log1p(x):
    """log(1 + x), accurate for tiny x (the classic u = 1 + x correction)."""
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|)."""
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    """1 / (1 + e^-x) without overflow for either sign."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

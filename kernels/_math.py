"""Numerically stable scalar functions shared by the heads (docs/methods.md §4, "Stable forms").

Built from exp and log only: the interpreter has no libdevice."""

import triton
import triton.language as tl


@triton.jit
def f64(pair, ACC: tl.constexpr):
    """Rebuild a float passed as an fp32 (hi, lo) pair (`_runtime.f64_pair`) in the dtype ACC."""
    return tl.cast(pair[0], ACC) + tl.cast(pair[1], ACC)


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


@triton.jit
def bf16_bits_rne(x):
    """The bfloat16 nearest to fp32 `x` (ties to even), as its 16 bits in a uint16: the top half
    of x's bits plus a carry of 0x7FFF + lsb; overflow rounds to ±inf, ±inf stays, and a NaN
    stays a (quiet) NaN of the same sign. For the interpreter, whose own fp32 -> bf16
    conversion truncates; the GPU's cvt.rn gives the same bits."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    quiet_nan = (bits >> 16) | 0x0040
    return tl.where(x != x, quiet_nan, rounded).to(tl.uint16)

"""Pass 3 of the fused family: the elementwise gradient (docs/methods.md §3, "Gradient form").

    grad[k] = G * (a_k * (p - t) + b_k * (p - r))      written in model_pred's dtype

`a`, `b` are the per-row coefficients a method's head wrote ([2, R] in ACC, `a` first; ACC is
the coefficients' dtype) and G
is the incoming gradient of the loss, read from device memory (no host sync, no shortcut for
G == 1). `ref_pred` is read only where b_k != 0 (DSPO winner rows), a predicated load.

The store rounds to nearest even, as the GPU's conversion does. Triton's interpreter converts
fp32 to bfloat16 by truncation (toward zero: magnitudes biased low by half an ulp on
average), so under the interpreter bfloat16 outputs are rounded by `_math.bf16_bits_rne` and
stored as their bits; compiled kernels keep the plain conversion. (float16 goes through
numpy under the interpreter, which already rounds to nearest even.)
"""

import functools

import torch
import triton
import triton.language as tl

from . import _runtime
from ._math import bf16_bits_rne

BLOCK = 2048


@triton.jit
def _grad_kernel(
    p_ptr,
    r_ptr,
    t_ptr,
    coef_ptr,
    coef_start,
    gout_ptr,
    grad_ptr,
    n,
    rows,
    stride_p,
    stride_r,
    stride_t,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    ACC: tl.constexpr = coef_ptr.dtype.element_ty
    coef_ptr += coef_start  # (the coefficients are a piece of the call's output buffer)
    row = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    g = tl.load(gout_ptr).to(ACC)
    a = tl.load(coef_ptr + row).to(ACC) * g
    p = tl.load(p_ptr + row * stride_p + idx, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + row * stride_t + idx, mask=mask, other=0.0).to(ACC)
    val = a * (p - t)
    if HAS_B:
        b = tl.load(coef_ptr + rows + row).to(ACC) * g
        # Rows with b == 0 skip the ref_pred read entirely (a predicated-off load).
        ref_mask = idx < tl.where(b != 0.0, n, 0)
        r = tl.load(r_ptr + row * stride_r + idx, mask=ref_mask, other=0.0).to(ACC)
        val = tl.where(ref_mask, val + b * (p - r), val)
    if RNE_BF16:
        # Interpreter only (see the module docstring): fp64 accumulations go through fp32 first,
        # as the compiled bf16 conversion does.
        bits = bf16_bits_rne(val.to(tl.float32))
        tl.store(grad_ptr + row * n + idx, bits.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(grad_ptr + row * n + idx, val.to(grad_ptr.dtype.element_ty), mask=mask)


def elementwise_grad(p, r, t, coef, coef_start, grad_output, has_b, rows, n, shape):
    """Gradient of the loss w.r.t. p (`rows` rows of `n` elements, rows `stride(0)` apart, as
    `reduce.row_sums` takes them): a new contiguous tensor of `shape` (None: p's own) and p's dtype.

    coef: a tensor holding the 2R coefficients (a, then b) in the accumulation dtype from its
    element `coef_start` on (the call's output buffer);
    grad_output: 0-dim tensor; r may be None when has_b is False."""
    # p is model_pred itself (shape None), or its [R, n] rows (a 2-D model_pred's have its shape)
    same = shape is None or p.dim() == len(shape)
    grad = _runtime.empty_like(p) if same else _runtime.empty(shape, p.dtype, p.device)
    r_arg = r if r is not None else p
    _runtime.launcher(_grad_kernel, p).run(
        p,
        r_arg,
        t,
        coef,
        coef_start,
        grad_output,
        grad,
        n,
        rows,
        p.stride()[0],
        r_arg.stride()[0],
        t.stride()[0],
        **_launch(has_b, _runtime.INTERPRET and p.dtype == torch.bfloat16, rows, n),
    )
    return grad


@functools.lru_cache(maxsize=4096)
def _launch(has_b, rne_bf16, rows, n):
    """The launch's constexpr, grid and option keywords (built once per shape)."""
    grid = (rows, -(-n // BLOCK))  # (triton.cdiv is a slow constexpr_function on the host)
    return dict(HAS_B=has_b, BLOCK=BLOCK, RNE_BF16=rne_bf16, num_warps=8, grid=grid, warmup=False)

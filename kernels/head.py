"""Pass 2 of the fused family: one single-program kernel that runs a method's head on the
per-row sums and writes the loss, the metrics and the per-row gradient coefficients.

The head is a constexpr of the kernel (a @triton.jit function: Triton compiles one head kernel
per method and configuration), so a new method is a new head, not a new kernel family, and no
line here names a method. `run_head` fills the head's runtime parameters by name
(kernels/method.py says which names exist) and passes its constexprs C, ACC, NP, SP.
"""

import torch
import triton
import triton.language as tl

from . import _runtime
from .method import Method


@triton.jit
def _head_kernel(args, HEAD: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr):
    HEAD(*args, C, ACC, NP, SP)


def _strides(x):
    """(row stride, element stride) of a 2-D tensor; (element stride, 0) of a 1-D or 0-dim one."""
    if x.dim() == 2:
        return x.stride(0), x.stride(1)
    return (x.stride(0) if x.dim() == 1 else 0), 0


def head_args(method: Method, values, floats, inputs):
    """The runtime arguments of `method`'s head, in its parameter order, each found by name:
    in `values` (the launch's buffers and sizes), in `floats` (hyperparameters, each passed as
    an fp32 (hi, lo) pair) or from `inputs` (an extra tensor `<name>`, its `<name>_strides`
    and `<name>_len`; an absent one is replaced by the partial sums, which the head does not
    read then: its options say the input is absent)."""
    available = dict(values)
    available.update((name, _runtime.f64_pair(float(value))) for name, value in floats.items())
    for name in method.inputs:
        x = inputs.get(name)
        x = values["part_ptr"] if x is None else x
        available.update(
            {name: x, f"{name}_strides": _strides(x), f"{name}_len": x.shape[-1] if x.dim() == 2 else x.numel()}
        )
    missing = [name for name in method.head_params() if name not in available]
    if missing:
        raise TypeError(f"head of {method.name!r}: no value for its parameter(s) {missing}")
    return tuple(available[name] for name in method.head_params())


def run_head(method: Method, partials, splits, rows, count, n, floats=None, options=None, inputs=None):
    """Launch `method`'s head on the partial sums of `rows` rows of `n` elements.

    count: the number of pairs B for paired methods, the rows N (or kept rows) for row methods.
    floats: hyperparameters by name (the head's parameter names); options: the head's
    compile-time options by name (`method.Method.config`); inputs: extra tensors by name
    (embeddings, timesteps, labels, a baseline; None where absent). Returns (loss, stats,
    ints, coef): a 0-dim loss and the stats buffer in the accumulation dtype, int64 integer
    metrics, and the [2, R] gradient coefficients."""
    acc = partials.dtype
    device = partials.device
    pairs = count if method.paired else 0
    loss = _runtime.empty((), acc, device)
    stats = _runtime.empty((method.layout.size(pairs),), acc, device)
    ints = _runtime.empty((max(len(method.layout.ints), 1),), torch.int64, device)
    coef = _runtime.empty((2, rows), acc, device)
    values = dict(
        part_ptr=partials,
        rows=rows,
        B=count,
        count=count,
        splits=splits,
        inv_n=_runtime.f64_pair(1.0 / n),
        loss_ptr=loss,
        stats_ptr=stats,
        ints_ptr=ints,
        coef_ptr=coef,
    )
    args = head_args(method, values, floats or {}, inputs or {})
    np_ = _runtime.next_pow2(count if method.paired else rows)
    _head_kernel[(1,)](
        args,
        HEAD=method.head,
        C=method.config(options or {}),
        ACC=_runtime.tl_dtype(acc),
        NP=np_,
        SP=_runtime.next_pow2(splits),
        num_warps=4,
    )
    return loss, stats, ints, coef

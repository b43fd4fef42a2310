"""The fused losses as PyTorch custom operators, and the kernel calls they run.

Operators (torch.library, namespace ``fastpref``; docs/methods.md §3 for the three passes):

* ``fused_loss(model_pred, ref_pred?, target, inputs, method, options, floats, count)
  -> (loss, buf)``: row sums + the method's head. ``loss`` is 0-dim, ``buf`` the 1-D output
  buffer (accumulation dtype) holding the int64 metrics, the stats and the gradient
  coefficients (`kernels.method.Layout.offsets`). Differentiable in model_pred (its autograd
  formula is registered with `torch.library.register_autograd` and runs ``fused_loss_backward``).
* ``fused_loss_backward(model_pred, ref_pred?, target, buf, grad_loss, coef_start) -> grad``.
* ``head(partials, inputs, method, options, floats, rows, count, n) -> (loss, buf)``: the head
  pass alone (what a traced CUDA forward calls after its row-sum launch).

Where the kernels are compiled (CUDA), ``fused_loss`` and ``fused_loss_backward`` are
`torch.library.triton_op`s: torch.compile decomposes them and Inductor sees the row-sum and
gradient launches (`kernels._runtime.launcher` wraps them with `wrap_triton` when traced); the
head, whose constexprs (a @triton.jit function, a `HeadConfig`) are not values Inductor can
write into generated code, stays the opaque ``head`` operator. Under Triton's interpreter (the
CPU), every operator is an opaque `torch.library.custom_op` whose kernel is the same Python
function. Every operator has a fake (meta) implementation, so FakeTensor/meta shape inference,
torch.compile(fullgraph=True) and torch.export trace without running a kernel.

`forward` and `backward` are the only code that launches the kernels: the operators' kernels
call them, and so does the eager path (`fastpref.functions.FusedLossFunction`, which calls them
directly rather than through the dispatcher: an operator call with registered autograd costs
~80 us of host time per forward+backward, three times the fused loss's own).
"""

import torch
from torch import Tensor

from fastpref._validate import compute_dtype
from fastpref.kernels import INTERPRET, _runtime
from fastpref.kernels import fused as _fused
from fastpref.kernels import grad as _grad
from fastpref.kernels import head as _head
from fastpref.kernels import reduce as _reduce


def as_rows(x):
    """[R, ...] -> [R, n] view with unit stride along n (a copy only for layouts that need one)."""
    if x is None:
        return None
    rows = x if x.dim() == 2 else x.reshape(x.shape[0], -1)
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def _rows(x):
    """What the kernels read for x: x itself when contiguous (each row contiguous, rows
    `stride(0)` apart: no view to make), else its [R, n] rows (`as_rows`)."""
    return x if x is None or x.is_contiguous() else as_rows(x)


def traced(x):
    """Whether a call on `x` is being traced (torch.compile, torch.export, FakeTensor or meta
    shape inference, functionalization, a tensor subclass, a functorch transform): then it must go through the
    operators; a plain tensor in eager mode takes the direct path."""
    return (
        type(x) is not torch.Tensor
        or x.is_meta
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
    )


def forward(model_pred, ref_pred, target, hp, floats, inputs, count):
    """Launch one forward of plan `hp` (a `kernels.head.HeadPlan`): row sums and head, or the
    one-launch kernel when it is on (`kernels._runtime.set_one_launch`).

    floats: the head's float parameters in `hp.float_names` order; inputs: its extra tensors in
    descriptor order (None where absent); count: pairs B or kept rows. Returns (loss, buf,
    saved): the 0-dim loss; the one output buffer (accumulation dtype, laid out as
    `hp.buffer` says: the int64 metrics, the stats, the coefficients, then the row sums, except
    when traced, where those have a tensor of their own); saved: what `backward` needs,
    (p, r, t, buf, coefficients' start, rows, n, model_pred's shape or None where p is
    model_pred) with r None unless the method reads it there (has_b).
    No tensor view is made: the kernels take the buffer and the start of each piece."""
    method = hp.method
    rows = model_pred.shape[0]
    n = model_pred.numel() // rows
    p, r, t = _rows(model_pred), _rows(ref_pred), _rows(target)
    acc = compute_dtype(model_pred, ref_pred, target)
    device = model_pred.device
    geo = _reduce.geometry(rows, n, r is not None, method.cross, device)
    pairs = rows // 2 if method.paired else 0
    if type(p) is not torch.Tensor:
        # A traced triton_op (CUDA): Inductor sees the row-sum launch; the head is an operator.
        partials = _runtime.empty((geo.planes, rows, geo.splits), acc, device)
        _reduce.row_sums(p, r, t, partials, geo, rows, n)
        loss, buf = torch.ops.fastpref.head(partials, inputs, method.name, hp.encoded, floats, rows, count, n)
        starts = hp.buffer(pairs, rows, acc).starts
    else:
        layout = hp.buffer(pairs, rows, acc, geo.planes * rows * geo.splits)
        starts = layout.starts
        loss = _runtime.empty((), acc, device)
        buf = _runtime.empty(layout.total, acc, device)
        pairs_f = _runtime.float_pairs(tuple(floats))
        if _runtime.ONE_LAUNCH:
            _fused.row_sums_head(hp, p, r, t, geo, rows, n, count, pairs_f, inputs, loss, buf, starts)
        else:
            _reduce.row_sums(p, r, t, buf, geo, rows, n, starts[0])
            _head.run_head(hp, buf, geo.splits, rows, count, n, pairs_f, inputs, loss, buf, starts)
    shape = None if p is model_pred else model_pred.shape  # (the gradient's shape: p's, or this)
    return loss, buf, (p, r if method.has_b else None, t, buf, starts[2], rows, n, shape)


def backward(saved, grad_loss):
    """The gradient w.r.t. model_pred (a new contiguous tensor of model_pred's shape and dtype)
    from `forward`'s `saved` and the incoming gradient (0-dim)."""
    p, r, t, buf, coef_start, rows, n, shape = saved
    return _grad.elementwise_grad(p, r, t, buf, coef_start, grad_loss, r is not None, rows, n, shape)


# ---- the operators ---------------------------------------------------------------------------


def _fused_loss(
    model_pred: Tensor,
    ref_pred: Tensor | None,
    target: Tensor,
    inputs: list[Tensor | None],
    method: str,
    options: str,
    floats: list[float],
    count: int,
) -> tuple[Tensor, Tensor]:
    hp = _head.find_plan(method, options)
    loss, buf, _ = forward(model_pred, ref_pred, target, hp, floats, inputs, count)
    return loss, buf[: _op_buffer(hp, model_pred.shape[0], buf.dtype).total]  # as traced: no partials


def _op_buffer(hp, rows, acc):
    """The `kernels.head.Buffer` of the operators' output buffer (no room for the partials)."""
    return hp.buffer(rows // 2 if hp.method.paired else 0, rows, acc)


def _fused_loss_fake(model_pred, ref_pred, target, inputs, method, options, floats, count):
    hp = _head.find_plan(method, options)
    acc = compute_dtype(model_pred, ref_pred, target)
    total = _op_buffer(hp, model_pred.shape[0], acc).total
    return model_pred.new_empty((), dtype=acc), model_pred.new_empty((total,), dtype=acc)


def _fused_loss_backward(
    model_pred: Tensor, ref_pred: Tensor | None, target: Tensor, buf: Tensor, grad_loss: Tensor, coef_start: int
) -> Tensor:
    rows = model_pred.shape[0]
    p = _rows(model_pred)
    saved = p, _rows(ref_pred), _rows(target), buf, coef_start, rows, model_pred.numel() // rows, model_pred.shape
    return backward(saved, grad_loss)


def _fused_loss_backward_fake(model_pred, ref_pred, target, buf, grad_loss, coef_start):
    return model_pred.new_empty(model_pred.shape)


def _head_op(
    partials: Tensor,
    inputs: list[Tensor | None],
    method: str,
    options: str,
    floats: list[float],
    rows: int,
    count: int,
    n: int,
) -> tuple[Tensor, Tensor]:
    hp = _head.find_plan(method, options)
    acc, device = partials.dtype, partials.device
    layout = _op_buffer(hp, rows, acc)
    loss, buf = _runtime.empty((), acc, device), _runtime.empty(layout.total, acc, device)
    floats = _runtime.float_pairs(tuple(floats))
    starts = (0, *layout.starts[1:])  # the partials: a tensor of their own
    _head.run_head(hp, partials, partials.shape[2], rows, count, n, floats, inputs, loss, buf, starts)
    return loss, buf


def _head_op_fake(partials, inputs, method, options, floats, rows, count, n):
    hp = _head.find_plan(method, options)
    return partials.new_empty(()), partials.new_empty((_op_buffer(hp, rows, partials.dtype).total,))


def _setup_context(ctx, inputs, output):
    model_pred, ref_pred, target, extra, method, options, floats, _ = inputs
    ctx.nones = _none_like(extra), _none_like(floats)
    hp = _head.find_plan(method, options)
    buf = output[1]
    ctx.coef_start = _op_buffer(hp, model_pred.shape[0], buf.dtype).starts[2]
    ctx.save_for_backward(model_pred, ref_pred if hp.method.has_b else None, target, buf)
    ctx.mark_non_differentiable(buf)
    ctx.set_materialize_grads(False)


def _none_like(values):
    """The "no gradient" of a list input, in the structure torch.library compares the backward's
    return with: a list of tensors (an empty list too) is a list node, one None per element;
    any other list (floats, or tensors with a None among them) is one leaf."""
    return [None] * len(values) if all(isinstance(x, torch.Tensor) for x in values) else None


def _backward_formula(ctx, grad_loss, grad_buf):
    grad = None
    if grad_loss is not None and ctx.needs_input_grad[0]:
        model_pred, ref_pred, target, buf = ctx.saved_tensors
        grad = torch.ops.fastpref.fused_loss_backward(model_pred, ref_pred, target, buf, grad_loss, ctx.coef_start)
    return grad, None, None, ctx.nones[0], None, None, ctx.nones[1], None


_define = torch.library.custom_op if INTERPRET else torch.library.triton_op
fused_loss = _define("fastpref::fused_loss", _fused_loss, mutates_args=())
fused_loss.register_fake(_fused_loss_fake)  # (a triton_op's own fake would trace the kernels)
fused_loss.register_autograd(_backward_formula, setup_context=_setup_context)
fused_loss_backward = _define("fastpref::fused_loss_backward", _fused_loss_backward, mutates_args=())
fused_loss_backward.register_fake(_fused_loss_backward_fake)
head = torch.library.custom_op("fastpref::head", _head_op, mutates_args=())
head.register_fake(_head_op_fake)

"""The autograd Functions of the fused losses.

Forward: row sums (1 launch) + the method's head (1 launch), which also leaves the per-row
gradient coefficients. Backward: one elementwise launch. Saved state is O(B) plus references
to the inputs; no full-size temporary besides the gradient itself.
"""
import torch
from torch.autograd.function import once_differentiable

from fastpref._validate import compute_dtype
from fastpref.kernels import HEADS, elementwise_grad, row_sums, run_head


def _as_rows(x):
    """[R, ...] -> [R, n] view with unit stride along n (a copy only for layouts that need one)."""
    if x is None:
        return None
    rows = x.reshape(x.shape[0], -1)
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


class _FusedLossFunction(torch.autograd.Function):
    """Shared forward/backward. Subclasses fix the method and name their arguments."""

    @staticmethod
    def _forward(ctx, head, model_pred, ref_pred, target, count, variant, hyper, n_inputs):
        p, r, t = _as_rows(model_pred), _as_rows(ref_pred), _as_rows(target)
        partials, splits = row_sums(p, r, t, compute_dtype(model_pred, ref_pred, target))
        loss, stats, ints, coef = run_head(head, partials, splits, p.shape[0], count, p.shape[1], variant, hyper)
        ctx.save_for_backward(p, r if head.has_b else None, t, coef)
        ctx.has_b = head.has_b
        ctx.shape = model_pred.shape
        ctx.n_inputs = n_inputs
        ctx.mark_non_differentiable(stats, ints)
        return loss, stats, ints

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_stats, grad_ints):
        p, r, t, coef = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = elementwise_grad(p, r, t, coef, grad_loss, ctx.has_b).view(ctx.shape)
        return (grad,) + (None,) * (ctx.n_inputs - 1)


class DiffusionDPOFunction(_FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, beta: float, loss_type_id: int 0 sigmoid,
    1 hinge, 2 ipo) -> (loss 0-dim, stats, ints). Inputs are not validated here: use
    `fastpref.diffusion_dpo_loss`."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, loss_type_id):
        return _FusedLossFunction._forward(
            ctx, HEADS["dpo"], model_pred, ref_pred, target, model_pred.shape[0] // 2, loss_type_id, (beta,), 5)


class SFTFunction(_FusedLossFunction):
    """apply(model_pred [N,...], target, winners_only: bool) -> (loss, stats, ints)."""

    @staticmethod
    def forward(ctx, model_pred, target, winners_only):
        keep = model_pred.shape[0] // 2 if winners_only else model_pred.shape[0]
        return _FusedLossFunction._forward(ctx, HEADS["sft"], model_pred, None, target, keep, 0, (), 3)


class DSPOFunction(_FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, beta, variant_id: 0 sd15 / 1 sdxl,
    sdxl_threshold) -> (loss, stats, ints)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, variant_id, sdxl_threshold):
        return _FusedLossFunction._forward(
            ctx, HEADS["dspo"], model_pred, ref_pred, target, model_pred.shape[0] // 2, variant_id,
            (beta, sdxl_threshold), 6)

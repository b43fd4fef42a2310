"""The autograd Functions of the fused losses.

Forward: row sums (1 launch) + the method's head (1 launch), which also leaves the per-row
gradient coefficients. Backward: one elementwise launch. Saved state is O(B) plus references
to the inputs; no full-size temporary besides the gradient itself.

The Functions do not validate their inputs: the functions of `fastpref.losses` do, then call
`apply`. Each returns (loss, stats, ints); `fastpref.kernels.HEADS[name].unpack` names them.
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
    def _forward(ctx, name, n_inputs, model_pred, ref_pred, target, count, variant=0, hyper=(), aux=(),
                 flag=False):
        head = HEADS[name]
        p, r, t = _as_rows(model_pred), _as_rows(ref_pred), _as_rows(target)
        partials, splits = row_sums(p, r, t, compute_dtype(model_pred, ref_pred, target), cross=head.cross)
        loss, stats, ints, coef = run_head(head, partials, splits, p.shape[0], count, p.shape[1], variant, hyper,
                                           aux, flag)
        ctx.save_for_backward(p, r if head.has_b else None, t, coef)
        ctx.has_b = head.has_b
        ctx.shape = model_pred.shape
        ctx.n_inputs = n_inputs
        ctx.mark_non_differentiable(stats, ints)
        ctx.set_materialize_grads(False)     # no zero-filled grads for the metric outputs
        return loss, stats, ints

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_stats, grad_ints):
        p, r, t, coef = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            grad = elementwise_grad(p, r, t, coef, grad_loss, ctx.has_b).view(ctx.shape)
        return (grad,) + (None,) * (ctx.n_inputs - 1)


def _pairs(x):
    return x.shape[0] // 2


class DiffusionDPOFunction(_FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, beta, loss_type_id: 0 sigmoid, 1 hinge, 2 ipo)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, loss_type_id):
        return _FusedLossFunction._forward(ctx, "dpo", 5, model_pred, ref_pred, target, _pairs(model_pred),
                                           loss_type_id, (beta,))


class SFTFunction(_FusedLossFunction):
    """apply(model_pred [N,...], target, winners_only: bool)."""

    @staticmethod
    def forward(ctx, model_pred, target, winners_only):
        keep = _pairs(model_pred) if winners_only else model_pred.shape[0]
        return _FusedLossFunction._forward(ctx, "sft", 3, model_pred, None, target, keep)


class DSPOFunction(_FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, beta, variant_id: 0 sd15 / 1 sdxl, sdxl_threshold)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, variant_id, sdxl_threshold):
        return _FusedLossFunction._forward(ctx, "dspo", 6, model_pred, ref_pred, target, _pairs(model_pred),
                                           variant_id, (beta, sdxl_threshold))


class RPOFunction(_FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, emb_w [B,D] or None, emb_l [B,D] or None, beta, tau)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, emb_w, emb_l, beta, tau):
        return _FusedLossFunction._forward(ctx, "rpo", 7, model_pred, ref_pred, target, _pairs(model_pred), 0,
                                           (beta, tau), (emb_w, emb_l), emb_w is not None)


class RPODiagonalFunction(_FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, beta, diagonal_weight)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, diagonal_weight):
        return _FusedLossFunction._forward(ctx, "rpo_diagonal", 5, model_pred, ref_pred, target, _pairs(model_pred),
                                           0, (beta, diagonal_weight))


class SSPOFunction(_FusedLossFunction):
    """apply(model_pred [2B,...] (winners, then self-samples), ref_pred, target, beta,
    criterion_id: 0 indicator / 1 sign)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, criterion_id):
        return _FusedLossFunction._forward(ctx, "sspo", 5, model_pred, ref_pred, target, _pairs(model_pred),
                                           criterion_id, (beta,))


class DenseDPOFunction(_FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, timesteps [B] or [2B], beta, gamma,
    num_inference_steps, num_train_timesteps, weight_scale)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, timesteps, beta, gamma, steps, train_steps, scale):
        return _FusedLossFunction._forward(ctx, "dense_dpo", 9, model_pred, ref_pred, target, _pairs(model_pred),
                                           0, (beta, gamma, float(steps), float(train_steps), scale), (timesteps,))


class KTOFunction(_FusedLossFunction):
    """apply(model_pred [N,...], ref_pred, target, labels [N], beta, lambda_d, lambda_u,
    kl_mode: 0 batch / 1 float / 2 tensor, kl_value: float, kl_tensor: 0-dim tensor or None)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, labels, beta, lambda_d, lambda_u, kl_mode, kl_value, kl_tensor):
        return _FusedLossFunction._forward(ctx, "kto", 10, model_pred, ref_pred, target, model_pred.shape[0],
                                           kl_mode, (beta, lambda_d, lambda_u, kl_value), (labels, kl_tensor))


class MaPOFunction(_FusedLossFunction):
    """apply(model_pred [2B,...], target, beta, snr_value, num_train_timesteps)."""

    @staticmethod
    def forward(ctx, model_pred, target, beta, snr_value, train_steps):
        return _FusedLossFunction._forward(ctx, "mapo", 5, model_pred, None, target, _pairs(model_pred), 0,
                                           (beta, snr_value, float(train_steps)))


class SDPOFunction(_FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, base_id: 0 dpo / 1 dspo sd15 / 2 dspo sdxl /
    3 dmpo, safeguard, beta, mu, eps, max_scale, sdxl_threshold, dmpo_alpha)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, base_id, safeguard, beta, mu, eps, max_scale, threshold, alpha):
        return _FusedLossFunction._forward(ctx, "sdpo", 12, model_pred, ref_pred, target, _pairs(model_pred),
                                           base_id, (beta, mu, eps, max_scale, threshold, alpha), (), safeguard)


class DMPOFunction(_FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, beta, alpha)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, alpha):
        return _FusedLossFunction._forward(ctx, "dmpo", 5, model_pred, ref_pred, target, _pairs(model_pred), 0,
                                           (beta, alpha))
